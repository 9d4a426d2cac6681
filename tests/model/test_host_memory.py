"""malloc keeps what a forward frees: the next allocation of the same size faults no page in.

Each case runs in a fresh interpreter, whose malloc has its defaults until the code under test
changes them (this test process may have changed its own already). Linux with glibc only.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Page faults of allocating, touching and freeing 24 MiB, twice, through the C library.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from loraserve.model.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(24 << 20)
        ctypes.memset(block, 1, 24 << 20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults[1])
    """
)
PAGES = (24 << 20) // 4096


def second_allocation_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(result.stdout)


def test_freed_memory_is_reused_without_page_faults() -> None:
    assert second_allocation_faults("keep") < PAGES // 10


def test_by_default_the_same_allocation_faults_its_pages_in_again() -> None:
    """What `keep_freed_memory` changes: without it the probe sees every page fault again."""
    assert second_allocation_faults("default") > PAGES // 2
