"""The kernel builds of every instruction set, compiled once per test session into a cache of
their own (this CPU's own copied from the user's cache where the set-up built it): the build
test checks the compile and the cache's pruning on it, and the kernels' tests run their
comparisons on it under each variant this CPU can run.

The compile takes minutes of both cores, and the suite around it uses about one: so when the
collected tests ask for it, it starts as collection ends, in a process beside the tests, and the
fixture waits for it where a test first needs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraserve.model.kernels import build

STALE_BUILDS = 6  # of each variant, seeded into the cache before the build
BUILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class EveryVariantBuilt:
    """`python -m loraserve.model.kernels --all` run once with XDG_CACHE_HOME=cache_home. Its
    kernel cache held `stale` empty builds of each variant it compiled (the first the most
    recently used), and this CPU's own build, where the set-up has made it, copied in: compiled
    again it would only cost the suite minutes (`test_the_kernels_this_cpu_runs_build_and_load`
    checks that one)."""

    cache_home: Path
    stale: dict[str, list[Path]]
    returncode: int
    stderr: str

    @property
    def kernels(self) -> Path:
        return self.cache_home / "loraserve" / "kernels"


@dataclass(frozen=True)
class BuildUnderWay:
    """The `--all` build started beside the tests: its process writes its stderr to a file."""

    cache_home: Path
    stale: dict[str, list[Path]]
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def wait(self) -> EveryVariantBuilt:
        returncode = self.process.wait(timeout=BUILD_TIMEOUT_S)
        stderr = self.stderr_path.read_text(errors="replace")
        return EveryVariantBuilt(self.cache_home, self.stale, returncode, stderr)

    def discard(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.cache_home, ignore_errors=True)


UNDER_WAY = pytest.StashKey[BuildUnderWay]()


def start_every_variant_build() -> BuildUnderWay:
    cache_home = Path(tempfile.mkdtemp(prefix="loraserve-every-variant-"))
    kernels = cache_home / "loraserve" / "kernels"
    host = build.host_variant()
    built = build.library_path(host) if host is not None else None  # in this user's cache
    copied = host.name if host is not None and built is not None and built.exists() else None
    if built is not None and copied is not None:
        (kernels / built.parent.name).mkdir(parents=True)
        shutil.copy2(built, kernels / built.parent.name / built.name)
    stale = {}
    for name in build.VARIANTS:
        if name == copied:
            continue
        stale[name] = [
            kernels / f"torch-0.0-{age:012d}-{name}" for age in range(1, STALE_BUILDS + 1)
        ]
        for age, folder in enumerate(stale[name], start=1):
            folder.mkdir(parents=True)
            (folder / f"loraserve_cpu_{name}.so").write_bytes(b"")
            os.utime(folder, (1e9 - age, 1e9 - age))
    stderr_path = cache_home / "build.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraserve.model.kernels", "--all"],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env=dict(os.environ, XDG_CACHE_HOME=str(cache_home)),
        )  # fmt: skip
    return BuildUnderWay(cache_home, stale, process, stderr_path)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("every_variant_built" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[UNDER_WAY] = start_every_variant_build()


def pytest_unconfigure(config: pytest.Config) -> None:
    under_way = config.stash.get(UNDER_WAY, None)
    if under_way is not None:
        under_way.discard()


@pytest.fixture(scope="session")
def every_variant_built(request: pytest.FixtureRequest) -> EveryVariantBuilt:
    stash = request.config.stash
    if UNDER_WAY not in stash:  # collected some other way than the hook saw
        stash[UNDER_WAY] = start_every_variant_build()
    return stash[UNDER_WAY].wait()
