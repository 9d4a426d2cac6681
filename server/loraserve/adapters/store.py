"""The on-disk adapter store: the source of truth for published adapters.

Adapters are addressed as (tenant, name, version) and a published version never changes.
Layout under `root` (one process owns a root; an index built at start-up answers reads):

    <tenant>/<name>/versions/<version>/  adapter_config.json, adapter_model.safetensors,
                                         manifest.json (sha256 and size of each file, ...)
    <tenant>/<name>/latest               the id of the version `resolve` returns by default
    .staging/<random>                    uploads, deletions and pointer updates in flight

A publish (see `staging`) writes, fsyncs and validates its files in `.staging`; `place` writes
the manifest, renames the directory into place, fsyncs the parent and only then moves `latest`.
Start-up empties `.staging` and indexes what is left, so a crash at any point leaves each
version absent or complete. `check_writable` (before an upload) and `place` refuse a version
that exists, and one the tenant's quota has no room for (`quota`). Identifiers are never
paths: they match a strict pattern, and every path built from them is refused when any
component below the root is a symbolic link. A request
resolves its adapter with `lookup`, from the index alone (no disk access); the files are read,
after the link checks, through `directory` on the loader thread.

Knows nothing about validation, devices, caches or gRPC.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from loraserve.adapters.keys import AdapterKey, Source, store_key
from loraserve.adapters.manifest import AdapterManifest, AdapterRef, check_identifier, is_identifier
from loraserve.adapters.peft_config import parse_json
from loraserve.adapters.quota import StoredUsage, check_room
from loraserve.types import (
    UNLIMITED,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    TenantQuota,
)

MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
LATEST_FILE = "latest"
STAGING_DIR = ".staging"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512  # a token this store issues is under 200

log = logging.getLogger(__name__)


def _version_order(version: str) -> tuple[int, int, str]:
    """Store-assigned integer versions in numeric order, then caller-given ids by name."""
    return (0, int(version), version) if version.isdigit() else (1, 0, version)


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


def _is_plain(path: Path, kind: Callable[[int], bool] = stat.S_ISDIR) -> bool:
    """Whether `path` is a directory (or `kind`) itself; lstat: a link to one is not one."""
    try:
        return kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class AdapterStore:
    """Place, resolve, list and delete adapter versions under `root`; safe across threads.

    checkpoint(step) is called at every step of a mutation where a crash must leave the store
    consistent (the crash tests kill the process there).
    """

    def __init__(self, root: str | Path, checkpoint: Callable[[str], None] | None = None) -> None:
        self.root = Path(root).resolve()
        self.checkpoint = checkpoint or _no_checkpoint
        self._staging = self.root / STAGING_DIR
        self._versions: dict[tuple[str, str], dict[str, AdapterManifest]] = {}
        self._latest: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._recover()

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
            if version is not None and version in self._versions.get((tenant, name), {}):
                raise _exists(tenant, name, version)
            new_name = (tenant, name) not in self._versions
            check_room(tenant, self._usage(tenant), quota, new_name, added_bytes)

    def usage(self, tenant: str) -> StoredUsage:
        """What `tenant` stores now."""
        with self._lock:
            return self._usage(tenant)

    def _usage(self, tenant: str) -> StoredUsage:
        names = [versions for (t, _), versions in self._versions.items() if t == tenant]
        manifests = [m for versions in names for m in versions.values()]
        stored = sum(f["size"] for m in manifests for f in m.files.values())
        return StoredUsage(len(names), len(manifests), stored)

    def staging_directory(self) -> Path:
        """A new, empty directory to stage a version in (emptied at the next start-up)."""
        directory = self._staging / secrets.token_hex(8)
        directory.mkdir()
        return directory

    def delete(self, tenant: str, name: str, version: str | None = None) -> None:
        """Delete one version, or every version of `name` when `version` is None.

        `latest` moves back to the newest remaining version (by publish time).
        """
        self._dir(tenant, name, version)
        with self._lock:
            versions = self._known(tenant, name, version)
            name_dir = self._dir(tenant, name)
            doomed = self._staging / secrets.token_hex(8)
            if version is None or len(versions) == 1:
                os.rename(name_dir, doomed)
                _fsync_dir(name_dir.parent)
                self.checkpoint("delete:moved")
                del self._versions[(tenant, name)], self._latest[(tenant, name)]
            else:
                os.rename(self._dir(tenant, name, version), doomed)
                _fsync_dir(name_dir / VERSIONS_DIR)
                self.checkpoint("delete:moved")
                del versions[version]
                if self._latest[(tenant, name)] == version:
                    self._write_latest("delete", tenant, name, _newest(versions))
            shutil.rmtree(doomed)
        log.info("deleted %s/%s%s", tenant, name, f"@{version}" if version else "")

    def place(
        self, staged: Path, manifest: AdapterManifest, quota: TenantQuota = UNLIMITED
    ) -> AdapterManifest:
        """Publish the validated files in `staged` (from `staging_directory`) as `manifest`'s
        version ("" = the next integer): write the manifest, rename into place, move `latest`.
        QuotaExceededError when the tenant's `quota` has no room for it."""
        key = (manifest.tenant, manifest.name)
        size = sum(f["size"] for f in manifest.files.values())
        with self._lock:
            versions_dir = self._dir(*key) / VERSIONS_DIR
            on_disk = os.listdir(versions_dir) if _is_plain(versions_dir) else []
            version = manifest.version or str(
                1 + max((int(v) for v in on_disk if v.isdigit()), default=0)
            )  # the next integer after any on disk, including ones start-up ignored
            target = self._dir(*key, version)
            if version in on_disk:
                raise _exists(manifest.tenant, manifest.name, version)
            usage = self._usage(manifest.tenant)
            check_room(manifest.tenant, usage, quota, key not in self._versions, size)
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
            self._versions.setdefault(key, {})[version] = manifest
            self._write_latest("publish", *key, version)
        log.info("published %s", manifest.ref)
        return manifest

    def _write_latest(self, operation: str, tenant: str, name: str, version: str) -> None:
        name_dir = self._dir(tenant, name)
        temporary = self._staging / f"latest-{secrets.token_hex(8)}"
        _write_durably(temporary, f"{version}\n".encode())
        self.checkpoint(f"{operation}:latest-staged")
        os.replace(temporary, name_dir / LATEST_FILE)
        _fsync_dir(name_dir)
        self._latest[(tenant, name)] = version
        self.checkpoint(f"{operation}:latest-moved")

    def resolve(self, tenant: str, name: str, version: str | None = None) -> AdapterRef:
        """The ref of `version`, or of the `latest` version when None."""
        self._dir(tenant, name, version)
        with self._lock:
            self._known(tenant, name, version)
            return AdapterRef(tenant, name, version or self._latest[(tenant, name)])

    def lookup(self, tenant: str, name: str, version: str | None = None) -> AdapterKey | None:
        """The key of `version` (None: the latest) from the index alone, without touching the
        disk; None when no such adapter is stored (or could be: not an identifier), so a caller
        can fall back to adapters registered elsewhere."""
        if not all(map(is_identifier, (tenant, name, version or "latest"))):
            return None
        with self._lock:
            versions = self._versions.get((tenant, name), {})
            manifest = versions.get(version or self._latest.get((tenant, name), ""))
        return None if manifest is None else store_key(manifest)

    def versions(self, tenant: str, name: str) -> list[AdapterManifest]:
        """Every stored version of tenant/name, oldest first."""
        self._dir(tenant, name)
        with self._lock:
            versions = self._known(tenant, name, None)
            return [versions[v] for v in sorted(versions, key=_version_order)]

    def manifest(self, ref: AdapterRef) -> AdapterManifest:
        self._dir(ref.tenant, ref.name, ref.version)
        with self._lock:
            return self._known(ref.tenant, ref.name, ref.version)[ref.version]

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
            return (m.name, _version_order(m.version))

        with self._lock:
            manifests = [
                m
                for (t, _), versions in self._versions.items()
                if t == tenant
                for m in versions.values()
                if after is None or order(m) > order(after)
            ]
        manifests.sort(key=order)
        page = manifests[:page_size]
        if len(manifests) <= page_size:
            return page, ""
        last = json.dumps([page[-1].name, page[-1].version]).encode()
        return page, base64.urlsafe_b64encode(last).decode()

    def _known(self, tenant: str, name: str, version: str | None) -> dict[str, AdapterManifest]:
        """The versions of tenant/name, after checking that `version` is among them."""
        versions = self._versions.get((tenant, name))
        if not versions:
            raise AdapterNotFoundError(f"adapter {tenant}/{name} is not published")
        if version is not None and version not in versions:
            raise AdapterNotFoundError(f"adapter {tenant}/{name} has no version {version!r}")
        return versions

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
        """Empty the staging area, index every complete version and repair `latest` pointers."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.path.islink(self._staging):
            self._staging.unlink()
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir()
        _fsync_dir(self.root)
        for tenant_dir in sorted(self.root.iterdir()):
            if tenant_dir.name == STAGING_DIR or not self._indexable(tenant_dir, "tenant"):
                continue
            for name_dir in sorted(tenant_dir.iterdir()):
                if self._indexable(name_dir, "adapter name"):
                    self._index_name(tenant_dir.name, name_dir)

    def _index_name(self, tenant: str, name_dir: Path) -> None:
        versions_dir = name_dir / VERSIONS_DIR
        versions = {}
        for version_dir in sorted(versions_dir.iterdir()) if _is_plain(versions_dir) else ():
            if not self._indexable(version_dir, "version"):
                continue
            try:
                manifest = _read_manifest(version_dir)
                if manifest.ref != AdapterRef(tenant, name_dir.name, version_dir.name):
                    raise ValueError("its tenant, name or version differs from its path")
            except (OSError, ValueError, TypeError, KeyError, InvalidRequestError) as e:
                log.warning("ignoring %s: no valid manifest (%s)", version_dir, e)
                continue
            versions[version_dir.name] = manifest
        if not versions:
            return
        key = (tenant, name_dir.name)
        self._versions[key] = versions
        latest_path = name_dir / LATEST_FILE
        latest = latest_path.read_text().strip() if _is_plain(latest_path, stat.S_ISREG) else ""
        if latest not in versions:
            log.warning("%s/%s: latest %r is not a complete version; repairing", *key, latest)
            self._write_latest("recover", *key, _newest(versions))
        else:
            self._latest[key] = latest

    def _indexable(self, path: Path, kind: str) -> bool:
        if is_identifier(path.name) and _is_plain(path):
            return True
        log.warning("ignoring %s: not a directory named as a valid %s", path, kind)
        return False


def _read_manifest(version_dir: Path) -> AdapterManifest:
    """The version's manifest, after checking each file it names is a plain file of its size."""
    if not _is_plain(version_dir / MANIFEST_FILE, stat.S_ISREG):
        raise ValueError(f"{MANIFEST_FILE} is missing or not a plain file")
    manifest = AdapterManifest.from_json((version_dir / MANIFEST_FILE).read_text())
    for filename, facts in manifest.files.items():
        path = version_dir / filename
        if not _is_plain(path, stat.S_ISREG) or path.stat().st_size != facts["size"]:
            raise ValueError(f"{filename} is not a plain file of {facts['size']} bytes")
    return manifest


def _exists(tenant: str, name: str, version: str) -> AdapterExistsError:
    return AdapterExistsError(
        f"{tenant}/{name}@{version} already exists: versions are immutable; upload under a new "
        "version, or leave the version empty for the next number"
    )


def _newest(versions: Mapping[str, AdapterManifest]) -> str:
    return max(versions.values(), key=lambda m: (m.created_at, _version_order(m.version))).version


def _no_checkpoint(step: str) -> None:
    """The default crash-test hook: does nothing."""
