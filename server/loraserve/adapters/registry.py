"""Names -> adapter keys: adapters registered from directories, and each tenant's stored ones.

`resolve(name, tenant, version)` answers from memory (and the store's one `lstat`): the
tenant's own stored adapters first (the store's index), then the ones registered under a name
for every tenant.
`directory(key)` says where a key's files are, for the loader thread; a replaced local
adapter's directory stays known for the requests still holding its key.

Knows nothing about tiers, slots or loading.
"""

from __future__ import annotations

import threading
from pathlib import Path

from loraserve.adapters.keys import AdapterKey, Source
from loraserve.adapters.manifest import check_identifier
from loraserve.adapters.store import AdapterStore
from loraserve.types import AdapterNotFoundError, shown


class AdapterRegistry:
    def __init__(self, store: AdapterStore | None = None) -> None:
        self._store = store
        self._local: dict[str, AdapterKey] = {}  # name -> key of its current registration
        self._paths: dict[AdapterKey, Path] = {}  # every local key ever registered
        self._lock = threading.Lock()

    def register(self, key: AdapterKey, directory: Path) -> AdapterKey | None:
        """Register a local `key` under its name (`key.reference`); returns the key it replaced."""
        with self._lock:
            replaced = self._local.get(key.reference)
            self._local[key.reference] = key
            self._paths[key] = directory
        return replaced

    def unregister(self, name: str) -> AdapterKey:
        """Stop resolving `name`; returns the key it resolved to."""
        with self._lock:
            key = self._local.pop(name, None)
        if key is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        return key

    def resolve(
        self, name: str | None, tenant: str | None = None, version: str | None = None
    ) -> AdapterKey | None:
        """The key of `name` for `tenant` (its own adapters first, then shared); None = base.

        A name or version that is not an identifier is InvalidRequestError, as on every RPC."""
        if not name:
            return None
        check_identifier("adapter name", name)
        if version:
            check_identifier("version", version)
        if self._store is not None and tenant is not None:
            key = self._store.lookup(tenant, name, version)
            if key is not None:
                return key
        with self._lock:
            key = self._local.get(name)
        if key is None or version:
            raise AdapterNotFoundError(
                f"adapter {shown(name)}{f' version {shown(version)}' if version else ''} not "
                "found; upload it first, or omit the adapter to use the base model"
            )
        return key

    def directory(self, key: AdapterKey) -> Path:
        """Where `key`'s files are; AdapterNotFoundError when nothing holds them any more."""
        if key.source is Source.STORE:
            if self._store is None:
                raise AdapterNotFoundError(f"adapter {key} needs an adapter store")
            return self._store.directory(key)
        with self._lock:
            directory = self._paths.get(key)
        if directory is None:
            raise AdapterNotFoundError(f"adapter {key} was never registered")
        return directory
