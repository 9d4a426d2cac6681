"""Building and loading the compiled CPU kernels: unlike the kernels' own tests, which skip where
there is no build for this CPU, these fail when a build that should exist does not compile."""

from __future__ import annotations

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
def test_every_variant_compiles_and_only_recent_builds_stay(every_variant_built):
    """The AVX-512 build compiles even on a machine without AVX-512 (and vice versa), and each
    new build leaves its instruction set's KEEP_BUILDS most recently used builds in the cache."""
    assert every_variant_built.returncode == 0, every_variant_built.stderr
    cache = every_variant_built.kernels
    for name, stale in every_variant_built.stale.items():
        kept = sorted(cache.glob(f"torch-*-{name}"))
        assert len(kept) == build.KEEP_BUILDS
        assert set(stale[: build.KEEP_BUILDS - 1]) < set(kept)  # and the new build
    built = [p for p in cache.rglob("*.so") if p.stat().st_size > 0]
    assert len(built) == len(build.VARIANTS)
