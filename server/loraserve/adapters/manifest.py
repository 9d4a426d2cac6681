"""What names a stored adapter version and what its manifest records.

Identifiers (tenant, name, version) are never paths: they match a strict pattern. The manifest
holds each file's sha256 and size and the facts a loader or a listing needs, and the fingerprint
of the base model the version was validated against.

Knows nothing about the disk layout or publishing: `store` does that.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from loraserve.adapters import peft_format
from loraserve.types import InvalidRequestError, shown

IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IDENTIFIER_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit, no '..'"
ADAPTER_FILES = (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE)
FINGERPRINT_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
)  # fmt: skip
MANIFEST_STRINGS = ("tenant", "name", "version", "dtype", "created_at", "base_fingerprint")


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None and ".." not in value


def check_identifier(kind: str, value: str) -> str:
    """`value` if it is a valid tenant, name or version; InvalidRequestError otherwise."""
    if not is_identifier(value):
        raise InvalidRequestError(
            f"{kind} {shown(value)} is not a valid identifier: {IDENTIFIER_RULE}"
        )
    return value


def base_fingerprint(model_config: Mapping, quantization: str) -> str:
    """A short hash of what decides whether an adapter fits: architecture shapes, quantization."""
    key = {k: model_config.get(k) for k in FINGERPRINT_KEYS} | {"quantization": quantization}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str
    version: str

    def __post_init__(self) -> None:
        check_identifier("tenant", self.tenant)
        check_identifier("adapter name", self.name)
        check_identifier("version", self.version)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """The ref that `str` wrote (identifiers hold neither '/' nor '@')."""
        tenant, _, rest = text.partition("/")
        name, _, version = rest.partition("@")
        return cls(tenant, name, version)


@dataclass(frozen=True)
class AdapterManifest:
    """What was published: file checksums and the adapter facts a loader or listing needs."""

    tenant: str
    name: str
    version: str
    files: dict[str, dict]  # filename -> {"sha256": hex, "size": bytes}
    rank: int  # the largest rank over modules
    target_modules: tuple[str, ...]  # module kinds, e.g. ("q_proj", "v_proj")
    lora_alpha: float
    use_rslora: bool
    dtype: str  # of the stored tensors, e.g. "float16" ("bfloat16,float32" when mixed)
    created_at: str  # ISO 8601, UTC
    base_fingerprint: str  # of the base model it was validated against

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterManifest:
        """Raises ValueError when `text` is not a manifest this store writes."""
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"a manifest holds exactly the keys {sorted(names)}")
        files, strings = data["files"], (data[f] for f in names if f in MANIFEST_STRINGS)
        if not (
            isinstance(files, dict)
            and set(files) == set(ADAPTER_FILES)
            and all(isinstance(f, dict) and f.keys() == {"sha256", "size"} for f in files.values())
            and all(isinstance(value, str) for value in strings)
            and isinstance(data["rank"], int)
            and isinstance(data["target_modules"], list)
        ):
            raise ValueError("a manifest field has the wrong type")
        return cls(**{**data, "target_modules": tuple(data["target_modules"])})
