"""What a tenant does with its adapters: publish, list, describe, delete, prefetch, pin.

The store (disk), the publisher (validation) and the adapter manager (host and device tiers)
together, for the API's AdapterService; every name resolves inside the caller's tenant first.
Deleting a version forgets its key, so no new request reaches it while in-flight ones finish on
the weights they hold.

Shared adapters (the operator's `--adapter NAME=DIR`, registered with `share`) are visible to
every tenant, read-only: Get and List describe them (`shared`, no tenant, no version), Prefetch
and Pin reach them, Delete refuses them. A tenant's own adapter of the same name wins, as it
does for generation. List gives the tenant's own versions first, then the shared adapters; a
page token that continues into the shared ones is `SHARED_TOKEN` and an index.

Knows nothing about gRPC or generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.keys import AdapterKey, store_key
from loraserve.adapters.manager import AdapterManager, AdapterStatus
from loraserve.adapters.manifest import AdapterManifest, check_identifier
from loraserve.adapters.staging import AdapterPublisher, StagedUpload
from loraserve.adapters.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, AdapterStore
from loraserve.types import (
    UNLIMITED,
    AdapterNotFoundError,
    InvalidRequestError,
    ReadOnlyAdapterError,
    TenantQuota,
    shown,
)

SHARED_TOKEN = "shared-"  # store tokens are base64 of JSON: never this prefix


@dataclass(frozen=True)
class StoredAdapter:
    manifest: AdapterManifest  # a shared adapter's has no tenant and no version
    status: AdapterStatus
    shared: bool = False


@dataclass(frozen=True)
class _Shared:
    manifest: AdapterManifest
    key: AdapterKey


class AdapterCatalog:
    def __init__(
        self, store: AdapterStore, publisher: AdapterPublisher, manager: AdapterManager
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._manager = manager
        self._shared: dict[str, _Shared] = {}

    def share(self, name: str, directory: str | Path) -> AdapterManifest:
        """Validate the operator's adapter at `directory` and serve it to every tenant as `name`
        (at start-up, before any call)."""
        manifest, weights = self._publisher.describe_shared(name, Path(directory))
        key = self._manager.load(name, directory, weights)
        self._shared[name] = _Shared(manifest, key)
        return manifest

    def staging(
        self,
        tenant: str,
        name: str,
        version: str | None,
        expected_sha256: Mapping[str, str],
        quota: TenantQuota = UNLIMITED,
        declared_bytes: int = 0,
    ) -> AbstractContextManager[StagedUpload]:
        """A writer for one new version (see `AdapterPublisher.staging`)."""
        return self._publisher.staging(
            tenant, name, version, expected_sha256, quota, declared_bytes
        )

    def describe(self, manifest: AdapterManifest) -> StoredAdapter:
        return StoredAdapter(manifest, self._manager.status(store_key(manifest)))

    def page(self, tenant: str, page_size: int, page_token: str) -> tuple[list[StoredAdapter], str]:
        """One page of the tenant's versions, then of the shared adapters, and the next page's
        token ("" after the last)."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        own: list[StoredAdapter] = []
        token, start = "", 0
        if page_token.startswith(SHARED_TOKEN):
            check_identifier("tenant", tenant)
            start = _shared_index(page_token)
        else:
            manifests, token = self._store.list_adapters(tenant, page_size, page_token)
            own = [self.describe(m) for m in manifests]
        if token:
            return own, token
        shared = [self._describe_shared(name) for name in sorted(self._shared)][start:]
        room = size - len(own)
        more = f"{SHARED_TOKEN}{start + room}" if len(shared) > room else ""
        return own + shared[:room], more

    def get(self, tenant: str, name: str, version: str | None) -> StoredAdapter:
        if self._shared_only(tenant, name, version):
            return self._describe_shared(name)
        return self.describe(self._manifest(tenant, name, version))

    def delete(self, tenant: str, name: str, version: str | None) -> list[str]:
        """Delete one version, or all of `name`; returns the versions deleted."""
        if self._shared_only(tenant, name, version):
            raise ReadOnlyAdapterError(
                f"adapter {shown(name)} is shared by the operator and read-only; a tenant "
                "deletes only the adapters it uploaded"
            )
        doomed = self._store.delete(tenant, name, version)
        for manifest in doomed:  # in-flight requests keep their slot; new ones cannot reach it
            self._manager.forget(store_key(manifest))
        return [m.version for m in doomed]

    def prefetch(self, tenant: str, name: str, version: str | None, wait_s: float) -> str:
        """Start loading into a device slot (into host RAM when no slot is free), wait up to
        `wait_s` for the loads, and return where it got to."""
        key = self._key(tenant, name, version)
        if not self._manager.prefetch(key):
            self._manager.warm_host(key)
        self._manager.wait_for_loads(wait_s)
        return self._manager.status(key).residency

    def pin(self, tenant: str, name: str, version: str | None, pinned: bool) -> bool:
        return self._manager.pin(self._key(tenant, name, version), pinned)

    def _shared_only(self, tenant: str, name: str, version: str | None) -> bool:
        """Whether `name` means a shared adapter for `tenant`: the tenant stores none of that
        name (after the same checks as for its own) and no version is asked for."""
        if name not in self._shared or version:
            return False
        try:
            self._store.versions(tenant, name)
        except AdapterNotFoundError:
            return True
        return False

    def _describe_shared(self, name: str) -> StoredAdapter:
        shared = self._shared[name]
        return StoredAdapter(shared.manifest, self._manager.status(shared.key), shared=True)

    def _manifest(self, tenant: str, name: str, version: str | None) -> AdapterManifest:
        return self._store.manifest(self._store.resolve(tenant, name, version))

    def _key(self, tenant: str, name: str, version: str | None) -> AdapterKey:
        if self._shared_only(tenant, name, version):
            return self._shared[name].key
        return store_key(self._manifest(tenant, name, version))


def _shared_index(token: str) -> int:
    digits = token[len(SHARED_TOKEN) :]
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
        raise InvalidRequestError("page_token is not one this server issued")
    return int(digits)
