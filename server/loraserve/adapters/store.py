"""The on-disk adapter store: the source of truth for published adapters.

Adapters are addressed as (tenant, name, version) and a published version never changes.
Layout under `root`, which several processes (replicas on one host, or on a shared volume) may
open at once:

    <tenant>/<name>/versions/<version>/  adapter_config.json, adapter_model.safetensors,
                                         manifest.json (sha256 and size of each file, ...)
    <tenant>/<name>/latest               the id of the version `resolve` returns by default
    .staging/<owner>-<purpose>-<random>  uploads, deletions and pointer updates in flight
    .lock  .generation  .owners/         what the processes share (see `shared_root`)

A publish (see `staging`) writes, fsyncs and validates its files in `.staging`; `place` writes
the manifest, renames the directory into place, fsyncs the parent and only then moves `latest`.
`place` and `delete` run under the root's inter-process lock, after catching up with what other
processes changed, so version numbers and quotas are decided on what is on disk; each change
bumps the root's generation. Start-up removes the staging entries of processes that are gone
and indexes what is left, so a crash at any point leaves each version absent or complete.
`check_writable` (before an upload) and `place` refuse a version that exists, and one the
tenant's quota has no room for (`quota`). Identifiers are never paths: they match a strict
pattern, and every path built from them is refused when any component below the root is a
symbolic link.

What other processes change reaches this one two ways. `lookup` (a request resolving its
adapter) answers from the index and checks, with one `lstat`, that the version's manifest is
still the one indexed; when it is not, or the name or version is unknown, it re-reads that one
name first. So a version deleted anywhere never reaches a new request here, and a version
published anywhere is found at once when asked for by number. `refresh` (every
`store_refresh_ms`, from `store_watch`) re-reads the whole store when the generation moved:
`latest` moving to another process's upload, listings and quotas lag by at most that period.
The files are read, after the link checks, through `directory` on the loader thread.

Knows nothing about validation, devices, caches or gRPC.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from loraserve.adapters.keys import AdapterKey, Source, store_key
from loraserve.adapters.manifest import AdapterManifest, AdapterRef, check_identifier, is_identifier
from loraserve.adapters.peft_config import parse_json
from loraserve.adapters.quota import StoredUsage, check_room
from loraserve.adapters.shared_root import RESERVED, SharedRoot
from loraserve.adapters.store_index import (
    LATEST_FILE,
    MANIFEST_FILE,
    VERSIONS_DIR,
    Indexed,
    NameIndex,
    indexable,
    is_plain,
    scan_name,
    stamp,
    version_order,
)
from loraserve.types import (
    UNLIMITED,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    TenantQuota,
)

STAGING_DIR = ".staging"
# Notes about a store beside its tenants (the repository's default store, ./adapters, has
# one): not a tenant, and nothing to warn about (no tenant is named with a dot)
STORE_NOTES = "README.md"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512  # a token this store issues is under 200

log = logging.getLogger(__name__)

Names = dict[tuple[str, str], NameIndex]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class AdapterStore:
    """Place, resolve, list and delete adapter versions under `root`; safe across threads and
    processes.

    checkpoint(step) is called at every step of a mutation where a crash must leave the store
    consistent (the crash tests kill the process there).
    """

    def __init__(self, root: str | Path, checkpoint: Callable[[str], None] | None = None) -> None:
        self.root = Path(root).resolve()
        self.checkpoint = checkpoint or _no_checkpoint
        self._staging = self.root / STAGING_DIR
        self._names: Names = {}
        self._generation = 0  # of the root, as the index last caught up with it
        self._removed: list[AdapterKey] = []  # versions other processes deleted, not yet told
        self._lock = threading.Lock()  # guards the index; held briefly, never across I/O
        self.root.mkdir(parents=True, exist_ok=True)
        if os.path.islink(self._staging):
            self._staging.unlink()
        self._staging.mkdir(exist_ok=True)
        self._shared = SharedRoot(self.root, self._staging)
        self._recover()

    def close(self) -> None:
        """Stop sharing the root (what this process left staged goes at the next start-up)."""
        self._shared.close()

    def check_writable(
        self,
        tenant: str,
        name: str,
        version: str | None = None,
        quota: TenantQuota = UNLIMITED,
        added_bytes: int = 0,
    ) -> None:
        """Refuse now, before any byte is staged, a bad identifier, a link in the way, a
        version that exists, or a version of `added_bytes` that `quota` has no room for."""
        self._dir(tenant, name, version)
        with self._lock:
            index = self._names.get((tenant, name))
            if version is not None and index is not None and version in index.versions:
                raise _exists(tenant, name, version)
            check_room(tenant, self._usage(tenant), quota, index is None, added_bytes)

    def usage(self, tenant: str) -> StoredUsage:
        """What `tenant` stores now."""
        with self._lock:
            return self._usage(tenant)

    def _usage(self, tenant: str) -> StoredUsage:
        names = [index for (t, _), index in self._names.items() if t == tenant]
        manifests = [i.manifest for index in names for i in index.versions.values()]
        stored = sum(f["size"] for m in manifests for f in m.files.values())
        return StoredUsage(len(names), len(manifests), stored)

    def staging_directory(self) -> Path:
        """A new, empty directory to stage a version in (removed at a later start-up if this
        process dies first)."""
        directory = self._staging / self._shared.entry_name("upload")
        directory.mkdir()
        return directory

    def delete(self, tenant: str, name: str, version: str | None = None) -> list[AdapterManifest]:
        """Delete one version, or every version of `name` when `version` is None; returns the
        manifests deleted, oldest first (decided under the lock: other processes' uploads
        included). `latest` moves back to the newest remaining version (by publish time).
        """
        self._dir(tenant, name, version)
        with self._shared.lock():
            self._catch_up()
            with self._lock:
                index = self._known(tenant, name, version)
            doomed_versions = [version] if version else sorted(index.versions, key=version_order)
            deleted = [index.versions[v].manifest for v in doomed_versions]
            name_dir = self._dir(tenant, name)
            doomed = self._staging / self._shared.entry_name("deleted")
            remaining: NameIndex | None = None
            if version is None or len(index.versions) == 1:
                os.rename(name_dir, doomed)
                _fsync_dir(name_dir.parent)
                self.checkpoint("delete:moved")
            else:
                os.rename(self._dir(tenant, name, version), doomed)
                _fsync_dir(name_dir / VERSIONS_DIR)
                self.checkpoint("delete:moved")
                versions = {v: i for v, i in index.versions.items() if v != version}
                remaining = NameIndex(versions, index.latest)
                if index.latest == version:
                    remaining = NameIndex(versions, remaining.latest)  # the newest left
                    self._write_latest("delete", tenant, name, remaining.pointer)
            self._publish_change((tenant, name), remaining)
            shutil.rmtree(doomed)
        log.info("deleted %s/%s%s", tenant, name, f"@{version}" if version else "")
        return deleted

    def place(
        self, staged: Path, manifest: AdapterManifest, quota: TenantQuota = UNLIMITED
    ) -> AdapterManifest:
        """Publish the validated files in `staged` (from `staging_directory`) as `manifest`'s
        version ("" = the next integer): write the manifest, rename into place, move `latest`.
        QuotaExceededError when the tenant's `quota` has no room for it."""
        key = (manifest.tenant, manifest.name)
        size = sum(f["size"] for f in manifest.files.values())
        with self._shared.lock():
            self._catch_up()
            versions_dir = self._dir(*key) / VERSIONS_DIR
            on_disk = os.listdir(versions_dir) if is_plain(versions_dir) else []
            version = manifest.version or str(
                1 + max((int(v) for v in on_disk if v.isdigit()), default=0)
            )  # the next integer after any on disk, including ones start-up ignored
            target = self._dir(*key, version)
            if version in on_disk:
                raise _exists(manifest.tenant, manifest.name, version)
            with self._lock:
                usage, before = self._usage(manifest.tenant), self._names.get(key)
            check_room(manifest.tenant, usage, quota, before is None, size)
            manifest = AdapterManifest(**{**asdict(manifest), "version": version})
            _write_durably(staged / MANIFEST_FILE, manifest.to_json().encode())
            _fsync_dir(staged)
            self.checkpoint("publish:staged")
            versions_dir.mkdir(parents=True, exist_ok=True)
            for directory in (self.root, versions_dir.parent.parent, versions_dir.parent):
                _fsync_dir(directory)  # make the new tenant, name and versions entries durable
            os.rename(staged, target)
            self.checkpoint("publish:renamed")
            _fsync_dir(versions_dir)
            indexed = Indexed(manifest, stamp(target) or _missing(target))
            self._write_latest("publish", *key, version)
            old = before.versions if before is not None else {}
            self._publish_change(key, NameIndex({**old, version: indexed}, version))
        log.info("published %s", manifest.ref)
        return manifest

    def _write_latest(self, operation: str, tenant: str, name: str, version: str) -> None:
        name_dir = self._dir(tenant, name)
        temporary = self._staging / self._shared.entry_name("latest")
        _write_durably(temporary, f"{version}\n".encode())
        self.checkpoint(f"{operation}:latest-staged")
        os.replace(temporary, name_dir / LATEST_FILE)
        _fsync_dir(name_dir)
        self.checkpoint(f"{operation}:latest-moved")

    def _publish_change(self, key: tuple[str, str], index: NameIndex | None) -> None:
        """After a change on disk (under the root's lock): tell the other processes, then
        index it here."""
        generation = self._shared.bump()
        with self._lock:
            if index is None:
                self._names.pop(key, None)
            else:
                self._names[key] = index
            self._generation = generation

    def resolve(self, tenant: str, name: str, version: str | None = None) -> AdapterRef:
        """The ref of `version`, or of the `latest` version when None."""
        self._dir(tenant, name, version)
        with self._lock:
            index = self._known(tenant, name, version)
            return AdapterRef(tenant, name, version or index.latest)

    def lookup(self, tenant: str, name: str, version: str | None = None) -> AdapterKey | None:
        """The key of `version` (None: the latest), after checking with one `lstat` that its
        files are still the ones indexed; None when no such adapter is stored (or could be: not
        an identifier), so a caller can fall back to adapters registered elsewhere. An unknown
        or changed name is re-read from disk once (another process published or deleted it)."""
        if not all(map(is_identifier, (tenant, name, version or "latest"))):
            return None
        for attempt in range(2):
            with self._lock:
                index = self._names.get((tenant, name))
                generation = self._generation
            indexed = None if index is None else index.versions.get(version or index.latest)
            if indexed is not None:
                where = self.root / tenant / name / VERSIONS_DIR / indexed.manifest.version
                if stamp(where) == indexed.stamp:
                    return store_key(indexed.manifest)
            if attempt == 0:
                self._refresh_name(tenant, name, generation)
        return None

    def refresh(self) -> list[AdapterKey]:
        """Catch up with what other processes changed, when the root's generation moved (one
        small file read otherwise); returns the keys of versions found deleted since the last
        call, so their weights can be dropped from the caches."""
        with self._lock:
            before = self._generation
        generation = self._shared.generation()
        if generation != before:
            self._swap(self._scan(quiet=True), before, generation)
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    def _catch_up(self) -> None:
        """Under the root's lock: index what other processes changed before deciding."""
        with self._lock:
            before = self._generation
        generation = self._shared.generation()
        if generation != before:
            self._swap(self._scan(quiet=True), before, generation)

    def _refresh_name(self, tenant: str, name: str, generation: int) -> None:
        """Re-read one name (links are never followed: a linked tenant or name has none)."""
        with self._lock:
            known = self._names.get((tenant, name))
        tenant_dir, names = self.root / tenant, {}
        if indexable(tenant_dir, "tenant", True) and indexable(tenant_dir / name, "name", True):
            index = scan_name(tenant, tenant_dir / name, known.versions if known else {}, True)
            names = {(tenant, name): index} if index.versions else {}
        self._swap(
            names,
            generation,
            generation,
            only=(tenant, name),
        )

    def _swap(
        self, names: Names, before: int, generation: int, only: tuple[str, str] | None = None
    ) -> None:
        """Replace the index (or the entry of `only`) with a scan made at `before`, unless
        this process changed the store meanwhile (its own change is newer than the scan)."""
        with self._lock:
            if self._generation != before:
                return
            for key in list(self._names) if only is None else [only]:
                self._removed += _gone(self._names.get(key), names.get(key))
            if only is None:
                self._names = names
            elif only in names:
                self._names[only] = names[only]
            else:
                self._names.pop(only, None)
            self._generation = generation

    def versions(self, tenant: str, name: str) -> list[AdapterManifest]:
        """Every stored version of tenant/name, oldest first."""
        self._dir(tenant, name)
        with self._lock:
            versions = self._known(tenant, name, None).versions
            return [versions[v].manifest for v in sorted(versions, key=version_order)]

    def manifest(self, ref: AdapterRef) -> AdapterManifest:
        self._dir(ref.tenant, ref.name, ref.version)
        with self._lock:
            return self._known(ref.tenant, ref.name, ref.version).versions[ref.version].manifest

    def path(self, ref: AdapterRef) -> Path:
        """The directory holding the version's files, ready for `read_peft_adapter`."""
        self.manifest(ref)
        return self._dir(ref.tenant, ref.name, ref.version)

    def directory(self, key: AdapterKey) -> Path:
        """The directory holding `key`'s files; AdapterNotFoundError once it is deleted (or its
        version id now holds other files)."""
        if key.source is not Source.STORE:
            raise AdapterNotFoundError(f"adapter {key} is not a stored one")
        ref = AdapterRef.parse(key.reference)
        if store_key(self.manifest(ref)) != key:
            raise AdapterNotFoundError(f"adapter {ref} was replaced since the request began")
        return self._dir(ref.tenant, ref.name, ref.version)

    def list_adapters(
        self, tenant: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AdapterManifest], str]:
        """One page of a tenant's versions, by name then version; "" as next token ends it."""
        check_identifier("tenant", tenant)
        if page_size < 0:
            raise InvalidRequestError(f"page_size must be >= 0 (0 = default), got {page_size}")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = None
        if page_token:
            try:
                if len(page_token) > MAX_PAGE_TOKEN_CHARS:
                    raise ValueError("too long")
                position = parse_json(base64.urlsafe_b64decode(page_token), "page_token")
                if not (isinstance(position, list) and len(position) == 2):
                    raise ValueError("not a [name, version] pair")
                after = AdapterRef(tenant, *position)
            except (ValueError, TypeError, InvalidRequestError):
                raise InvalidRequestError("page_token is not one this server issued") from None

        def order(m: AdapterManifest | AdapterRef) -> tuple:
            return (m.name, version_order(m.version))

        with self._lock:
            manifests = [
                i.manifest
                for (t, _), index in self._names.items()
                if t == tenant
                for i in index.versions.values()
                if after is None or order(i.manifest) > order(after)
            ]
        manifests.sort(key=order)
        page = manifests[:page_size]
        if len(manifests) <= page_size:
            return page, ""
        last = json.dumps([page[-1].name, page[-1].version]).encode()
        return page, base64.urlsafe_b64encode(last).decode()

    def _known(self, tenant: str, name: str, version: str | None) -> NameIndex:
        """The index of tenant/name, after checking that `version` is among its versions."""
        index = self._names.get((tenant, name))
        if index is None:
            raise AdapterNotFoundError(f"adapter {tenant}/{name} is not published")
        if version is not None and version not in index.versions:
            raise AdapterNotFoundError(f"adapter {tenant}/{name} has no version {version!r}")
        return index

    def _dir(self, tenant: str, name: str, version: str | None = None) -> Path:
        """root/tenant/name[/versions/version], refused if any existing component is a link."""
        parts = [check_identifier("tenant", tenant), check_identifier("adapter name", name)]
        if version is not None:
            parts += [VERSIONS_DIR, check_identifier("version", version)]
        path = self.root
        for part in parts:
            path = path / part
            try:
                is_link = stat.S_ISLNK(os.lstat(path).st_mode)
            except FileNotFoundError:
                break
            if is_link:
                raise InvalidRequestError(
                    f"{path.relative_to(self.root)} is a symbolic link: the adapter store "
                    "refuses links"
                )
        return self.root.joinpath(*parts)

    def _recover(self) -> None:
        """Remove what gone processes left staged, index every complete version and repair
        `latest` pointers that name no complete version."""
        with self._shared.lock():
            self._shared.clean_staging()
            _fsync_dir(self.root)
            names = self._scan(quiet=False)
            repaired = False
            for (tenant, name), index in names.items():
                if index.pointer != index.latest:
                    log.warning(
                        "%s/%s: latest %r is not a complete version; repairing",
                        tenant,
                        name,
                        index.pointer,
                    )
                    self._write_latest("recover", tenant, name, index.latest)
                    names[(tenant, name)] = NameIndex(index.versions, index.latest)
                    repaired = True
            generation = self._shared.bump() if repaired else self._shared.generation()
            with self._lock:
                self._names, self._generation = names, generation

    def _scan(self, quiet: bool) -> Names:
        """Every complete version on disk, reusing the manifests already indexed."""
        with self._lock:
            known = dict(self._names)
        names: Names = {}
        for tenant_dir in sorted(self.root.iterdir()):
            if tenant_dir.name in (STAGING_DIR, STORE_NOTES, *RESERVED):
                continue
            if not indexable(tenant_dir, "tenant", quiet):
                continue
            try:
                name_dirs = sorted(tenant_dir.iterdir())
            except FileNotFoundError:  # deleted meanwhile by another process
                continue
            for name_dir in name_dirs:
                if not indexable(name_dir, "adapter name", quiet):
                    continue
                key = (tenant_dir.name, name_dir.name)
                before = known.get(key)
                index = scan_name(key[0], name_dir, before.versions if before else {}, quiet)
                if index.versions:
                    names[key] = index
        return names


def _gone(before: NameIndex | None, after: NameIndex | None) -> list[AdapterKey]:
    """The keys of the versions in `before` that `after` no longer holds as they were."""
    if before is None:
        return []
    kept = after.versions if after is not None else {}
    return [store_key(i.manifest) for v, i in before.versions.items() if kept.get(v) != i]


def _missing(target: Path) -> NoReturn:
    raise FileNotFoundError(f"{target / MANIFEST_FILE} vanished while it was being placed")


def _exists(tenant: str, name: str, version: str) -> AdapterExistsError:
    return AdapterExistsError(
        f"{tenant}/{name}@{version} already exists: versions are immutable; upload under a new "
        "version, or leave the version empty for the next number"
    )


def _no_checkpoint(step: str) -> None:
    """The default crash-test hook: does nothing."""
