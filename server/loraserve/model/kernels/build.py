"""Compile loraserve's C++ CPU kernels, once per instruction set, into the user's cache.

`python -m loraserve.model.kernels` (run by `scripts/setup.sh`) builds the variant this
CPU runs; `--all` builds every variant at once, a compiler each (a compile check for CPUs this
machine does not have).
A build lands in a folder named after the torch version, the sources' hash and the instruction
set, so a changed source or another torch never loads a stale library. Each use of a build
touches its folder; a new build removes all but the KEEP_BUILDS most recently used builds of
its instruction set, so that upgrades do not pile libraries up in the cache.

Knows nothing about when a kernel is used: `kernels/__init__.py` loads the library it builds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
KEEP_BUILDS = 4  # of each instruction set in the cache, the most recently used
SOURCES = (
    "cpu_kernels.cpp", "parallel.h", "gemm.h", "amx.h", "attention.h", "lora.h", "scores.h",
    "norm.h", "kv.h", "rotary.h",
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One build: the vector width its kernels use and the compiler flags that enable it."""

    name: str
    lanes: int
    flags: tuple[str, ...]


VARIANTS = {
    "avx2": Variant("avx2", 8, ("-mavx2", "-mfma", "-mf16c")),
    "avx512": Variant(
        "avx512", 16, ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c")
    ),
    # The AVX-512 build's 16-lane blocking, decoding order and remainders, in AVX2 instructions:
    # never chosen for a CPU, only by LORASERVE_KERNELS=avx2-16, so that an AVX2 machine can
    # test the logic AVX-512 machines run.
    "avx2-16": Variant("avx2-16", 16, ("-mavx2", "-mfma", "-mf16c")),
}


def host_variant() -> Variant | None:
    """The variant this CPU runs, or None (not x86-64 with AVX2: the torch paths serve)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return VARIANTS["avx512"]
    if capability == "AVX2":
        return VARIANTS["avx2"]
    return None


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraserve" / "kernels"


def library_path(variant: Variant) -> Path:
    """Where `variant`'s library is (or would be) built."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    version = torch.__version__.replace("+", "_")
    folder = cache_root() / f"torch-{version}-{digest.hexdigest()[:12]}-{variant.name}"
    return folder / f"loraserve_cpu_{variant.name}.so"


def build(variant: Variant) -> Path:
    """Compile `variant` unless its library is already built; returns the library's path.

    Concurrent builds of one variant are safe: each writes its own file and renames it into
    place. Raises RuntimeError with the compiler's output when the compiler fails.
    """
    target = library_path(variant)
    if target.exists():
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(target.parent)  # used: the builds pruned are the least recently used
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial")
    started = time.monotonic()
    log.info("compiling loraserve's %s CPU kernels into %s", variant.name, target.parent)
    try:
        compile_library(variant, SOURCE_DIR / "cpu_kernels.cpp", partial)
    except RuntimeError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    log.info("compiled in %.0f s", time.monotonic() - started)
    for folder in prune(variant):
        log.info("removed the kernel build %s (not used lately)", folder)
    return target


def prune(variant: Variant, keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove all but the `keep` most recently used builds of `variant` from the cache (a
    process that has one loaded keeps it: the file lives on until it is unmapped); returns the
    folders removed."""
    builds = sorted(
        (f for f in cache_root().glob(f"torch-*-{variant.name}") if f.is_dir()),
        key=lambda folder: folder.stat().st_mtime,
        reverse=True,
    )
    for folder in builds[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    return builds[keep:]


def compile_library(variant: Variant, source: Path, output: Path) -> None:
    """Compile `source` (cpu_kernels.cpp, its headers beside it) for `variant` into `output`."""
    from torch.utils import cpp_extension

    command = [
        os.environ.get("CXX", "c++"),
        "-shared",
        "-fPIC",
        "-std=c++20",
        "-O3",
        "-fopenmp",
        "-fvisibility=hidden",
        f"-DLS_LANES={variant.lanes}",
        *variant.flags,
        *(f"-isystem{path}" for path in cpp_extension.include_paths()),
        str(source),
        "-o",
        str(output),
        *(f"-L{path}" for path in cpp_extension.library_paths()),
        "-lc10",
        "-ltorch_cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {variant.name} kernels failed:\n{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every variant, not just this CPU's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = host_variant()
    variants = list(VARIANTS.values()) if args.all else [host] if host is not None else []
    if not variants:
        log.info("this CPU has no AVX2: loraserve uses its torch paths, nothing to compile")
        return 0
    # each build is one compiler process: they share the cores, as a make -j would
    with ThreadPoolExecutor(max_workers=min(len(variants), os.cpu_count() or 1)) as pool:
        for library in pool.map(build, variants):
            print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
