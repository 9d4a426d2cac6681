"""Building and loading the compiled CPU kernels: unlike the kernels' own tests, which skip where
there is no build for this CPU, these fail when a build that should exist does not compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraserve.model.kernels import build, chosen_variant, native


def test_the_kernels_this_cpu_runs_build_and_load():
    """A CPU with AVX2 gets its kernels (unless LORASERVE_KERNELS turns them off): a source
    that does not compile fails here with the compiler's output, where the kernels' tests would
    only skip and the torch paths quietly serve."""
    variant = chosen_variant()
    if variant is None:
        pytest.skip("no AVX2 on this CPU, or LORASERVE_KERNELS=off: the torch paths serve")
    assert build.build(variant).exists()
    assert native() is not None, "the build exists but did not load"


@pytest.mark.slow
def test_every_variant_compiles_and_only_recent_builds_stay(tmp_path):
    """The AVX-512 build compiles even on a machine without AVX-512 (and vice versa), and each
    new build leaves its instruction set's KEEP_BUILDS most recently used builds in the cache."""
    cache = tmp_path / "loraserve" / "kernels"
    stale = {}
    for name in build.VARIANTS:
        stale[name] = [cache / f"torch-0.0-{age:012d}-{name}" for age in range(1, 7)]
        for age, folder in enumerate(stale[name], start=1):
            folder.mkdir(parents=True)
            (folder / f"loraserve_cpu_{name}.so").write_bytes(b"")
            os.utime(folder, (1e9 - age, 1e9 - age))  # the first, the most recently used
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "loraserve.model.kernels", "--all"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in build.VARIANTS:
        kept = sorted(cache.glob(f"torch-*-{name}"))
        assert len(kept) == build.KEEP_BUILDS
        assert set(stale[name][: build.KEEP_BUILDS - 1]) < set(kept)  # and the new build
    built = [p for p in cache.rglob("*.so") if p.stat().st_size > 0]
    assert len(built) == len(build.VARIANTS)
