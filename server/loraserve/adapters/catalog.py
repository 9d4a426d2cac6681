"""What a tenant does with its stored adapters: publish, list, describe, delete, prefetch, pin.

The store (disk), the publisher (validation) and the adapter manager (host and device tiers)
together, for the API's AdapterService; every name resolves inside the caller's tenant.
Deleting a version forgets its key, so no new request reaches it while in-flight ones finish on
the weights they hold.

Knows nothing about gRPC or generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from loraserve.adapters.keys import AdapterKey, store_key
from loraserve.adapters.manager import AdapterManager, AdapterStatus
from loraserve.adapters.manifest import AdapterManifest
from loraserve.adapters.staging import AdapterPublisher, StagedUpload
from loraserve.adapters.store import AdapterStore


@dataclass(frozen=True)
class StoredAdapter:
    manifest: AdapterManifest
    status: AdapterStatus


class AdapterCatalog:
    def __init__(
        self, store: AdapterStore, publisher: AdapterPublisher, manager: AdapterManager
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._manager = manager

    def staging(
        self, tenant: str, name: str, version: str | None, expected_sha256: Mapping[str, str]
    ) -> AbstractContextManager[StagedUpload]:
        """A writer for one new version (see `AdapterPublisher.staging`)."""
        return self._publisher.staging(tenant, name, version, expected_sha256)

    def describe(self, manifest: AdapterManifest) -> StoredAdapter:
        return StoredAdapter(manifest, self._manager.status(store_key(manifest)))

    def page(self, tenant: str, page_size: int, page_token: str) -> tuple[list[StoredAdapter], str]:
        """One page of the tenant's versions and the next page's token ("" after the last)."""
        manifests, token = self._store.list_adapters(tenant, page_size, page_token)
        return [self.describe(m) for m in manifests], token

    def get(self, tenant: str, name: str, version: str | None) -> StoredAdapter:
        return self.describe(self._manifest(tenant, name, version))

    def delete(self, tenant: str, name: str, version: str | None) -> list[str]:
        """Delete one version, or all of `name`; returns the versions deleted."""
        if version:
            doomed = [self._manifest(tenant, name, version)]
        else:
            doomed = self._store.versions(tenant, name)
        self._store.delete(tenant, name, version)
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

    def _manifest(self, tenant: str, name: str, version: str | None) -> AdapterManifest:
        return self._store.manifest(self._store.resolve(tenant, name, version))

    def _key(self, tenant: str, name: str, version: str | None) -> AdapterKey:
        return store_key(self._manifest(tenant, name, version))
