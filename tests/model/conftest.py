"""The kernel builds of every instruction set, compiled once per test session into a cache of
their own (this CPU's own copied from the user's cache where the set-up built it): the build
test checks the compile and the cache's pruning on it, and the kernels' tests run their
comparisons on it under each variant this CPU can run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraserve.model.kernels import build

STALE_BUILDS = 6  # of each variant, seeded into the cache before the build


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


@pytest.fixture(scope="session")
def every_variant_built(tmp_path_factory: pytest.TempPathFactory) -> EveryVariantBuilt:
    cache_home = tmp_path_factory.mktemp("every-variant")
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
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    result = subprocess.run(
        [sys.executable, "-m", "loraserve.model.kernels", "--all"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    return EveryVariantBuilt(cache_home, stale, result.returncode, result.stderr)
