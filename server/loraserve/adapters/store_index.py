"""Reading the store's layout into memory: which versions of each name are complete, which is
`latest`, and a stamp that tells whether a version's files are still the ones indexed.

`scan_name` reads one `<tenant>/<name>` directory, reusing the manifests of versions whose
stamp has not changed (a version never changes once placed, so a rescan costs a few `lstat`s
per version). It only reads: repairing a `latest` pointer is the store's, under its lock.

Knows nothing about locking, publishing or other processes.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.manifest import AdapterManifest, AdapterRef, is_identifier
from loraserve.types import InvalidRequestError

MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
LATEST_FILE = "latest"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stamp:
    """Which manifest file a version directory holds: a version deleted and published again
    under the same id (by this process or another) has a new one."""

    inode: int
    mtime_ns: int


@dataclass(frozen=True)
class Indexed:
    manifest: AdapterManifest
    stamp: Stamp


@dataclass(frozen=True)
class NameIndex:
    """The complete versions of one name; `pointer`: what its `latest` file says ("" when
    missing), which may name none of them after a crash or while another process deletes."""

    versions: dict[str, Indexed]
    pointer: str

    @property
    def latest(self) -> str:
        """The version `latest` resolves to: the pointer, or the newest when it is dangling."""
        if self.pointer in self.versions:
            return self.pointer
        return newest({v: i.manifest for v, i in self.versions.items()})


def version_order(version: str) -> tuple[int, int, str]:
    """Store-assigned integer versions in numeric order, then caller-given ids by name."""
    return (0, int(version), version) if version.isdigit() else (1, 0, version)


def newest(versions: Mapping[str, AdapterManifest]) -> str:
    return max(versions.values(), key=lambda m: (m.created_at, version_order(m.version))).version


def is_plain(path: Path, kind: Callable[[int], bool] = stat.S_ISDIR) -> bool:
    """Whether `path` is a directory (or `kind`) itself; lstat: a link to one is not one."""
    try:
        return kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def stamp(version_dir: Path) -> Stamp | None:
    """The stamp of the manifest in `version_dir`; None when there is no plain manifest."""
    try:
        st = os.lstat(version_dir / MANIFEST_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Stamp(st.st_ino, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def indexable(path: Path, kind: str, quiet: bool = False) -> bool:
    if is_identifier(path.name) and is_plain(path):
        return True
    if not quiet:
        log.warning("ignoring %s: not a directory named as a valid %s", path, kind)
    return False


def scan_name(
    tenant: str, name_dir: Path, known: Mapping[str, Indexed], quiet: bool = False
) -> NameIndex:
    """The complete versions under `name_dir`; `known`: what was indexed before (reused while
    its stamp holds); quiet: log nothing about what is ignored (rescans repeat start-up)."""
    versions_dir = name_dir / VERSIONS_DIR
    versions = {}
    try:
        entries = sorted(versions_dir.iterdir()) if is_plain(versions_dir) else []
    except FileNotFoundError:  # deleted meanwhile by another process
        entries = []
    for version_dir in entries:
        if not indexable(version_dir, "version", quiet):
            continue
        current = stamp(version_dir)
        if current is None:
            if not quiet:
                log.warning("ignoring %s: no %s", version_dir, MANIFEST_FILE)
            continue
        before = known.get(version_dir.name)
        if before is not None and before.stamp == current:
            versions[version_dir.name] = before
            continue
        try:
            manifest = read_manifest(version_dir)
            if manifest.ref != AdapterRef(tenant, name_dir.name, version_dir.name):
                raise ValueError("its tenant, name or version differs from its path")
        except (OSError, ValueError, TypeError, KeyError, InvalidRequestError) as e:
            if not quiet:
                log.warning("ignoring %s: no valid manifest (%s)", version_dir, e)
            continue
        versions[version_dir.name] = Indexed(manifest, current)
    latest_path = name_dir / LATEST_FILE
    try:
        pointer = latest_path.read_text().strip() if is_plain(latest_path, stat.S_ISREG) else ""
    except FileNotFoundError:
        pointer = ""
    return NameIndex(versions, pointer)


def read_manifest(version_dir: Path) -> AdapterManifest:
    """The version's manifest, after checking each file it names is a plain file of its size."""
    if not is_plain(version_dir / MANIFEST_FILE, stat.S_ISREG):
        raise ValueError(f"{MANIFEST_FILE} is missing or not a plain file")
    manifest = AdapterManifest.from_json((version_dir / MANIFEST_FILE).read_text())
    for filename, facts in manifest.files.items():
        path = version_dir / filename
        if not is_plain(path, stat.S_ISREG) or path.stat().st_size != facts["size"]:
            raise ValueError(f"{filename} is not a plain file of {facts['size']} bytes")
    return manifest
