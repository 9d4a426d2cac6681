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

# Page faults of allocating, touching and freeing a block of argv[3] MiB, twice, through the C
# library: on the main thread, on a thread of its own (as the server's engine loop runs), or on
# two threads alive together, the second allocating after the first freed (as an adapter read on
# one thread is dropped while the loader thread reads another).
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from loraserve.model.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = int(sys.argv[3]) << 20
    faults = []

    def allocate():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def on_thread(work):
        worker = threading.Thread(target=work)
        worker.start()
        return worker

    if sys.argv[2] == "thread":
        on_thread(lambda: (allocate(), allocate())).join()
    elif sys.argv[2] == "threads":
        freed, done = threading.Event(), threading.Event()
        first = on_thread(lambda: (allocate(), freed.set(), done.wait()))
        freed.wait()
        on_thread(allocate).join()
        done.set()
        first.join()
    else:
        allocate()
        allocate()
    print(faults[1])
    """
)


def second_allocation_faults(mode: str, where: str, mib: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode, where, str(mib)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


# 8 MiB: the order of an adapter's buffers in the host tier; 24 MiB: below glibc's largest mmap
# threshold; 40 MiB: above it (a prefill's [3183, 2816] fp32 activations are 36 MB), below the
# 64 MiB of a thread's heap.
@pytest.mark.parametrize("where", ["main", "thread", "threads"])
@pytest.mark.parametrize("mib", [8, 24, 40])
def test_freed_memory_is_reused_without_page_faults(where: str, mib: int) -> None:
    assert second_allocation_faults("keep", where, mib) < (mib << 20) // 4096 // 10


@pytest.mark.parametrize("where", ["main", "thread"])
def test_by_default_the_same_allocation_faults_its_pages_in_again(where: str) -> None:
    """What `keep_freed_memory` changes: without it the probe sees every page fault again."""
    assert second_allocation_faults("default", where, 40) > (40 << 20) // 4096 // 2
