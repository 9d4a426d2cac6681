"""What lets several processes share one adapter store root: a lock, a generation, owners.

- `lock()`: one publish, delete or start-up recovery at a time across every process on the
  root, by `fcntl.flock` on `<root>/.lock` (after a thread lock: flock excludes open files, not
  threads). On NFS, Linux maps flock to byte-range locks, so the mount needs working locks
  (NFSv4, or NFSv3 with lockd; never `nolock`).
- `generation()` / `bump()`: a counter in `<root>/.generation`, bumped under the lock after
  every change, so a process learns that another one changed the store by reading one small
  file (close-to-open consistency makes a fresh open see it on NFS too).
- owners: each process holds an exclusive flock on `<root>/.owners/<token>` while it lives and
  names its staging entries `<token>-...`; `clean_staging` removes only the entries of owners
  whose lock is free (they crashed or stopped), so one replica starting never removes another's
  uploads in flight.

Knows nothing about adapters, manifests or the layout below the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
GENERATION_FILE = ".generation"
OWNERS_DIR = ".owners"
RESERVED = (LOCK_FILE, GENERATION_FILE, OWNERS_DIR)  # and the store's own staging directory


class SharedRoot:
    """The inter-process parts of one store root; `staging` is the directory of entries in
    flight, whose names start with an owner's token."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        self._thread_lock = threading.Lock()
        self._lock_fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        owners = root / OWNERS_DIR
        owners.mkdir(exist_ok=True)
        self.token = secrets.token_hex(8)
        self._owner_fd = os.open(owners / self.token, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the root's lock: no other thread or process changes the store meanwhile."""
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def generation(self) -> int:
        """The root's change counter (0 before the first change)."""
        try:
            text = (self.root / GENERATION_FILE).read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text.isdigit() else 0

    def bump(self) -> int:
        """Count one change (under `lock`); returns the new generation."""
        generation = self.generation() + 1
        temporary = self.staging / self.entry_name("generation")
        temporary.write_text(f"{generation}\n")
        os.replace(temporary, self.root / GENERATION_FILE)
        return generation

    def entry_name(self, purpose: str) -> str:
        """A fresh staging entry name owned by this process."""
        return f"{self.token}-{purpose}-{secrets.token_hex(8)}"

    def clean_staging(self) -> None:
        """Remove the staging entries (and owner files) of owners that are gone (under `lock`)."""
        owners = self.root / OWNERS_DIR
        alive = {self.token} | {p.name for p in owners.iterdir() if _held(p)}
        for owner in owners.iterdir():
            if owner.name not in alive:
                owner.unlink(missing_ok=True)
        for entry in self.staging.iterdir():
            if entry.name.split("-", 1)[0] in alive:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def close(self) -> None:
        """Give up ownership (the next start-up removes what this process left staged)."""
        os.close(self._owner_fd)
        os.close(self._lock_fd)


def _held(path: Path) -> bool:
    """Whether a live process holds the lock of owner file `path`."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock taken just now, if any
    return False
