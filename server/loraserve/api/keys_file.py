"""The API-keys file: a closed, typed schema of keys, tenants, scopes and quotas.

    {"keys": [{"key_sha256": "<hex>", "tenant": "acme", "scopes": ["generate"]},
              {"key": "plain-text-key", "tenant": "ops", "scopes": ["generate", "admin"]}],
     "default_quota": {"max_requests_in_flight": 16},
     "quotas": {"acme": {"max_adapters": 20, "max_versions": 100,
                         "max_stored_bytes": 10000000000, "max_requests_in_flight": 64}}}

Every entry is checked before a key is used: unknown fields refused, tenant names follow the
adapter-name identifier rules (so `../evil` is refused), each key given once, as plain text or
as the hex SHA-256 of its text, scopes from the known three, quotas whole numbers. A tenant's
quota is its entry in `quotas`, each field it leaves out taken from `default_quota`; a field
set nowhere is no limit. `read_keys_file` returns the parsed `KeyTable` or raises ValueError
listing what is wrong (first few problems and a count).

Knows nothing about gRPC or requests: `auth` uses the table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraserve.adapters.manifest import IDENTIFIER_RULE, is_identifier
from loraserve.adapters.peft_config import parse_json
from loraserve.types import MAX_PROBLEMS_SHOWN, TenantQuota, clip

SCOPES = ("generate", "adapters:write", "admin")
MAX_FILE_BYTES = 4 << 20
MAX_KEYS = 10_000  # each call compares its key with every one


def _tenant(value: str) -> str:
    if not is_identifier(value):
        raise ValueError(f"{clip(value, 80)!r} is not a valid tenant name: {IDENTIFIER_RULE}")
    return value


Tenant = Annotated[str, AfterValidator(_tenant)]
Scope = Literal["generate", "adapters:write", "admin"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class KeyEntry(_Closed):
    key: str | None = Field(default=None, min_length=1, max_length=4096)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    tenant: Tenant
    scopes: list[Scope] = Field(default_factory=list, max_length=len(SCOPES))

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> bytes:
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        return hashlib.sha256((self.key or "").encode()).digest()


class QuotaEntry(_Closed):
    max_adapters: int | None = Field(default=None, ge=0)
    max_versions: int | None = Field(default=None, ge=0)
    max_stored_bytes: int | None = Field(default=None, ge=0)
    max_requests_in_flight: int | None = Field(default=None, ge=1)


class KeysFile(_Closed):
    keys: list[KeyEntry] = Field(max_length=MAX_KEYS)
    default_quota: QuotaEntry = QuotaEntry()
    quotas: dict[Tenant, QuotaEntry] = Field(default_factory=dict, max_length=MAX_KEYS)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its tenant and what its key may do."""

    tenant: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class KeyTable:
    """What one reading of the keys file says: key digest -> caller, tenant -> quota."""

    principals: Mapping[bytes, Principal]
    quotas: Mapping[str, TenantQuota]
    default_quota: TenantQuota

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(p.tenant for p in self.principals.values())

    def quota(self, tenant: str) -> TenantQuota:
        return self.quotas.get(tenant, self.default_quota)


def _quota(entry: QuotaEntry, default: TenantQuota | None = None) -> TenantQuota:
    values = {f.name: getattr(entry, f.name) for f in fields(TenantQuota)}
    if default is not None:
        values = {k: getattr(default, k) if v is None else v for k, v in values.items()}
    return TenantQuota(**values)


def _problems(error: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(part) for part in e['loc']) or '(top level)'}: {e['msg']}"
        for e in error.errors(include_url=False, include_input=False)
    ]


def _refusal(path: str | Path, problems: list[str]) -> ValueError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    text = "; ".join(clip(p, 200) for p in shown) + (f"; and {more} more" if more else "")
    return ValueError(f"API keys file {path}: {text}")


def parse_keys(data: bytes, path: str | Path) -> KeyTable:
    """The table `data` (the file's bytes) describes; ValueError lists what is wrong."""
    if len(data) > MAX_FILE_BYTES:
        raise _refusal(path, [f"larger than {MAX_FILE_BYTES} bytes"])
    try:
        parse_json(data, "the file")  # JSON, finite numbers, bounded depth: or say which not
        parsed = KeysFile.model_validate_json(data)
    except ValidationError as error:
        raise _refusal(path, _problems(error)) from None
    except ValueError as error:
        raise _refusal(path, [str(error)]) from None
    problems = []
    principals: dict[bytes, Principal] = {}
    for i, entry in enumerate(parsed.keys):
        if entry.digest in principals:
            problems.append(f"keys.{i}: the same key as an earlier entry; give each key once")
        principals[entry.digest] = Principal(entry.tenant, frozenset(entry.scopes))
    tenants = {p.tenant for p in principals.values()}
    for tenant in parsed.quotas:
        if tenant not in tenants:
            problems.append(f"quotas.{tenant}: no key belongs to this tenant")
    if problems:
        raise _refusal(path, problems)
    default = _quota(parsed.default_quota)
    quotas = {tenant: _quota(entry, default) for tenant, entry in parsed.quotas.items()}
    return KeyTable(principals, quotas, default)


def read_keys_file(path: str | Path) -> KeyTable:
    """Read and parse the keys file at `path`; ValueError says why it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ValueError(f"API keys file {path}: cannot read it: {error.strerror}") from None
    return parse_keys(data, path)
