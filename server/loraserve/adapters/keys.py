"""The one reference to an adapter's weights that travels from a request to a device slot.

An `AdapterKey` is resolved once, where a request names an adapter, and is immutable: replacing
or deleting an adapter makes a new key or forgets the old one, so a request holding a key can
never reach other weights than the ones it was resolved to.

Knows nothing about where the files live or how they are loaded: the registry and the store
answer that for a key.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.manifest import ADAPTER_FILES, AdapterManifest, AdapterRef


class Source(str, enum.Enum):
    LOCAL = "local"  # registered from a directory at start-up or from Python, shared by tenants
    STORE = "store"  # a published version in the adapter store, owned by one tenant


@dataclass(frozen=True)
class AdapterKey:
    """source: where the weights come from; reference: the name it was registered under (local)
    or tenant/name@version (store); sha256: `content_digest` of its files, so a version id or
    name reused for other files never aliases the old weights."""

    source: Source
    reference: str
    sha256: str

    @property
    def name(self) -> str:
        """The adapter's name as requests give it (no tenant, no version).

        The one label the engine exports per adapter, for the gateway gauge
        `vllm:lora_requests_info`: bounded, because only a registered or stored adapter has a key.
        """
        if self.source is Source.STORE:
            return AdapterRef.parse(self.reference).name
        return self.reference

    def __str__(self) -> str:
        return f"{self.source.value}:{self.reference}@sha256:{self.sha256[:12]}"


def content_digest(file_sha256: Mapping[str, str]) -> str:
    """One sha256 over the sha256 of each adapter file (config and weights, by file name)."""
    text = "".join(f"{name}:{file_sha256[name]}\n" for name in ADAPTER_FILES)
    return hashlib.sha256(text.encode()).hexdigest()


def store_key(manifest: AdapterManifest) -> AdapterKey:
    """The key of a stored version, from its manifest (no disk access)."""
    digests = {name: facts["sha256"] for name, facts in manifest.files.items()}
    return AdapterKey(Source.STORE, str(manifest.ref), content_digest(digests))


def local_key(name: str, directory: Path) -> AdapterKey:
    """The key of a directory registered under `name`, hashing its files now."""
    digests = {}
    for filename in ADAPTER_FILES:
        digest = hashlib.sha256()
        with (directory / filename).open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digests[filename] = digest.hexdigest()
    return AdapterKey(Source.LOCAL, name, content_digest(digests))
