"""The on-disk adapter store: the source of truth for published adapters.

Adapters are addressed as (tenant, name, version) and a published version never changes.
Layout under `root` (one process owns a root; an index built at start-up answers reads):

    <tenant>/<name>/versions/<version>/  adapter_config.json, adapter_model.safetensors,
                                         manifest.json (sha256 and size of each file, ...)
    <tenant>/<name>/latest               the id of the version `resolve` returns by default
    .staging/<random>                    uploads, deletions and pointer updates in flight

A publish writes and fsyncs its files in `.staging`, validates them there (`peft_format`: CPU
only, no network, no code import), writes the manifest, renames the directory into place,
fsyncs the parent and only then moves `latest`. Start-up empties `.staging` and indexes what is
left, so a crash at any point leaves each version absent or complete. Identifiers are never
paths: they match a strict pattern, and every path built from them is refused when any component
below the root is a symbolic link.

Knows nothing about devices, caches or gRPC.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import torch

from loraserve.adapters import peft_format
from loraserve.adapters.manifest import (
    ADAPTER_FILES,
    AdapterManifest,
    AdapterRef,
    check_identifier,
    is_identifier,
)
from loraserve.types import (
    AdapterNotFoundError,
    AdapterRefusedError,
    InvalidAdapterError,
    InvalidRequestError,
)

MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
LATEST_FILE = "latest"
STAGING_DIR = ".staging"
CHUNK_BYTES = 1 << 20
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}

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


def _file_name_problem(filename: str) -> str | None:
    if filename in ADAPTER_FILES:
        return None
    if filename in peft_format.PICKLE_FILES or filename.endswith((".bin", ".pt", ".pth", ".pkl")):
        return f"{filename[:80]!r}: {peft_format.PICKLE_ADVICE}"
    return f"{filename[:80]!r} is not an adapter file: upload only {' and '.join(ADAPTER_FILES)}"


@dataclass
class _StagedFile:
    handle: BinaryIO
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0


class StagedUpload:
    """One version being written into a staging directory; see `AdapterStore.staging`."""

    def __init__(
        self,
        store: AdapterStore,
        directory: Path,
        tenant: str,
        name: str,
        version: str | None,
        expected_sha256: Mapping[str, str] | None,
    ) -> None:
        self.store, self.directory = store, directory
        self.tenant, self.name, self.version = tenant, name, version
        self.expected_sha256 = dict(expected_sha256 or {})
        self.manifest: AdapterManifest | None = None
        self._files: dict[str, _StagedFile] = {}

    def write(self, filename: str, chunk: bytes) -> None:
        """Append `chunk` to `filename` (adapter_config.json or adapter_model.safetensors)."""
        problem = _file_name_problem(filename)
        if problem:
            raise InvalidAdapterError(f"upload of {self.tenant}/{self.name} refused:", [problem])
        staged = self._files.get(filename)
        if staged is None:
            staged = self._files[filename] = _StagedFile((self.directory / filename).open("xb"))
        cap = peft_format.MAX_WEIGHTS_BYTES
        if filename == peft_format.CONFIG_FILE:
            cap = peft_format.MAX_CONFIG_BYTES
        if staged.size + len(chunk) > cap:
            raise InvalidAdapterError(
                f"upload of {self.tenant}/{self.name} refused:",
                [f"{filename} is larger than the {cap} byte cap"],
            )
        staged.handle.write(chunk)
        staged.digest.update(chunk)
        staged.size += len(chunk)

    def commit(self) -> AdapterManifest:
        """Check checksums, validate against the base, and publish; returns the manifest."""
        if self.manifest is not None:
            raise InvalidRequestError(f"{self.manifest.ref} is already committed")
        self._seal()
        problems = []
        for filename, expected in sorted(self.expected_sha256.items()):
            staged = self._files.get(filename)
            if staged is None:
                problems.append(f"{filename}: a checksum was given but the file was not uploaded")
            elif staged.digest.hexdigest() != expected.lower():
                problems.append(
                    f"{filename}: sha256 {staged.digest.hexdigest()} does not match the "
                    f"expected {expected}"
                )
        if problems:
            raise InvalidAdapterError(f"upload of {self.tenant}/{self.name} is corrupt:", problems)
        store = self.store
        store._checkpoint("publish:files-written")
        try:
            weights = peft_format.read_peft_adapter(
                self.directory, store.targets, store.max_rank, torch.float32
            )
        except AdapterRefusedError as e:  # name the upload, not the staging directory
            verdict = "is invalid" if isinstance(e, InvalidAdapterError) else "does not fit"
            raise type(e)(f"upload of {self.tenant}/{self.name} {verdict}:", e.problems) from None
        header = peft_format.safetensors_header(self.directory / peft_format.WEIGHTS_FILE)
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        self.manifest = store._commit(
            self,
            AdapterManifest(
                tenant=self.tenant,
                name=self.name,
                version=self.version or "",
                files={
                    name: {"sha256": f.digest.hexdigest(), "size": f.size}
                    for name, f in sorted(self._files.items())
                },
                rank=weights.rank,
                target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights.modules})),
                lora_alpha=float(weights.config["lora_alpha"]),
                use_rslora=bool(weights.config.get("use_rslora")),
                dtype=",".join(sorted(SAFETENSORS_DTYPES.get(d, d) for d in dtypes)),
                created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                base_fingerprint=store.base_fingerprint,
            ),
        )
        return self.manifest

    def _seal(self) -> None:
        """Flush, fsync and close every file written so far (read-only from now on)."""
        for filename, staged in self._files.items():
            if not staged.handle.closed:
                staged.handle.flush()
                os.fsync(staged.handle.fileno())
                staged.handle.close()
                os.chmod(self.directory / filename, 0o444)

    def _discard(self) -> None:
        for staged in self._files.values():
            staged.handle.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class AdapterStore:
    """Publish, resolve, list and delete adapter versions under `root`; safe across threads.

    targets: module path -> (in_features, out_features) of the base's LoRA-targetable modules;
    every publish is validated against them, `max_rank`, and recorded with `base_fingerprint`.
    """

    def __init__(
        self,
        root: str | Path,
        base_fingerprint: str,
        targets: dict[str, tuple[int, int]],
        max_rank: int,
    ) -> None:
        self.root = Path(root).resolve()
        self.base_fingerprint = base_fingerprint
        self.targets = targets
        self.max_rank = max_rank
        self._staging = self.root / STAGING_DIR
        self._versions: dict[tuple[str, str], dict[str, AdapterManifest]] = {}
        self._latest: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._checkpoint: Callable[[str], None] = _no_checkpoint  # crash tests kill here
        self._recover()

    @contextlib.contextmanager
    def staging(
        self,
        tenant: str,
        name: str,
        version: str | None = None,
        expected_sha256: Mapping[str, str] | None = None,
    ) -> Iterator[StagedUpload]:
        """A writer for one new version: `write(filename, chunk)` as bytes arrive, then
        `commit()`. Whatever was not committed is removed on exit."""
        self._dir(tenant, name, version)
        directory = self._staging / secrets.token_hex(8)
        directory.mkdir()
        upload = StagedUpload(self, directory, tenant, name, version, expected_sha256)
        try:
            yield upload
        finally:
            if upload.manifest is None:
                upload._discard()

    def publish(
        self,
        tenant: str,
        name: str,
        files: Mapping[str, bytes | str | Path],
        version: str | None = None,
        expected_sha256: Mapping[str, str] | None = None,
    ) -> AdapterManifest:
        """Publish a new version from file contents or paths; `version` None -> next integer."""
        self._dir(tenant, name, version)
        problems = [p for p in map(_file_name_problem, sorted(files)) if p]
        if problems:
            raise InvalidAdapterError(f"upload of {tenant}/{name} refused:", problems)
        with self.staging(tenant, name, version, expected_sha256) as upload:
            for filename, content in sorted(files.items()):
                if isinstance(content, bytes):
                    upload.write(filename, content)
                    continue
                with open(content, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(CHUNK_BYTES), b""):
                        upload.write(filename, chunk)
            return upload.commit()

    def publish_dir(
        self, tenant: str, name: str, src_dir: str | Path, version: str | None = None
    ) -> AdapterManifest:
        """Import an existing PEFT directory (other files there, e.g. README.md, are ignored)."""
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(f"adapter directory {str(src)!r} does not exist")
        wanted = ADAPTER_FILES  # pickles only when there is no safetensors, to refuse them by name
        if not (src / peft_format.WEIGHTS_FILE).is_file():
            wanted += peft_format.PICKLE_FILES
        return self.publish(
            tenant, name, {f: src / f for f in wanted if (src / f).is_file()}, version
        )

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
                self._checkpoint("delete:moved")
                del self._versions[(tenant, name)], self._latest[(tenant, name)]
            else:
                os.rename(self._dir(tenant, name, version), doomed)
                _fsync_dir(name_dir / VERSIONS_DIR)
                self._checkpoint("delete:moved")
                del versions[version]
                if self._latest[(tenant, name)] == version:
                    self._write_latest("delete", tenant, name, _newest(versions))
            shutil.rmtree(doomed)
        log.info("deleted %s/%s%s", tenant, name, f"@{version}" if version else "")

    def _commit(self, upload: StagedUpload, manifest: AdapterManifest) -> AdapterManifest:
        """Name the version, write its manifest, rename it into place, then move `latest`."""
        key = (upload.tenant, upload.name)
        with self._lock:
            versions_dir = self._dir(*key) / VERSIONS_DIR
            on_disk = os.listdir(versions_dir) if _is_plain(versions_dir) else []
            version = upload.version or str(
                1 + max((int(v) for v in on_disk if v.isdigit()), default=0)
            )  # the next integer after any on disk, including ones start-up ignored
            target = self._dir(*key, version)
            if version in on_disk:
                raise InvalidRequestError(
                    f"{upload.tenant}/{upload.name}@{version} already exists: versions are "
                    "immutable, publish a new one"
                )
            manifest = AdapterManifest(**{**asdict(manifest), "version": version})
            _write_durably(upload.directory / MANIFEST_FILE, manifest.to_json().encode())
            _fsync_dir(upload.directory)
            self._checkpoint("publish:staged")
            versions_dir.mkdir(parents=True, exist_ok=True)
            for directory in (self.root, versions_dir.parent.parent, versions_dir.parent):
                _fsync_dir(directory)  # make the new tenant, name and versions entries durable
            os.rename(upload.directory, target)
            self._checkpoint("publish:renamed")
            _fsync_dir(versions_dir)
            self._versions.setdefault(key, {})[version] = manifest
            self._write_latest("publish", *key, version)
        log.info("published %s", manifest.ref)
        return manifest

    def _write_latest(self, operation: str, tenant: str, name: str, version: str) -> None:
        name_dir = self._dir(tenant, name)
        temporary = self._staging / f"latest-{secrets.token_hex(8)}"
        _write_durably(temporary, f"{version}\n".encode())
        self._checkpoint(f"{operation}:latest-staged")
        os.replace(temporary, name_dir / LATEST_FILE)
        _fsync_dir(name_dir)
        self._latest[(tenant, name)] = version
        self._checkpoint(f"{operation}:latest-moved")

    def resolve(self, tenant: str, name: str, version: str | None = None) -> AdapterRef:
        """The ref of `version`, or of the `latest` version when None."""
        self._dir(tenant, name, version)
        with self._lock:
            self._known(tenant, name, version)
            return AdapterRef(tenant, name, version or self._latest[(tenant, name)])

    def find(self, tenant: str, name: str, version: str | None = None) -> AdapterRef | None:
        """Like `resolve`, but None when no such adapter is stored (or could be: `name` is not
        an identifier), so a caller can fall back to adapters registered elsewhere."""
        if not all(map(is_identifier, (tenant, name, version or "latest"))):
            return None
        with contextlib.suppress(AdapterNotFoundError):
            return self.resolve(tenant, name, version)
        return None

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
                after = AdapterRef(tenant, *json.loads(base64.urlsafe_b64decode(page_token)))
            except (ValueError, TypeError, InvalidRequestError) as e:
                raise InvalidRequestError("page_token is not one this server issued") from e

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


def _newest(versions: Mapping[str, AdapterManifest]) -> str:
    return max(versions.values(), key=lambda m: (m.created_at, _version_order(m.version))).version


def _no_checkpoint(step: str) -> None:
    """The default crash-test hook: does nothing."""
