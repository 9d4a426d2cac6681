"""The C library's malloc, set up for a process whose forwards allocate and free tensors of the
same sizes every step.

torch's CPU tensors come straight from malloc. By default glibc maps every block above its
adaptive mmap threshold (at most 32 MiB) on its own and unmaps it when freed, and trims the
heap's free top, so the next step's tensors of the same sizes fault their pages in again, one
4 KiB page at a time. On the machines measured (docs/performance.md) a prefill step of the
default benchmark took about 450,000 such page faults. `keep_freed_memory` makes malloc keep
freed memory for reuse: no block is mapped on its own (every one comes from a heap, so a freed
one is there for the next request, whatever its size), the heap grows 64 MiB past each request
(fewer system calls), and it is trimmed only past 1 GiB of free top. One exception is glibc's:
a thread other than the main one allocates from heaps of at most 64 MiB, and a block larger
than that is still mapped on its own. The process's resident memory then stays near its
high-water mark between steps, as with any caching allocator.

`one_arena` makes every thread allocate from one arena. glibc gives each thread that allocates
a heap of its own (an arena, up to 8 per core), and memory freed in one is reused only by the
threads allocating from it: adapters validated on one thread (registration, an upload) and
dropped from the host tier later stay resident beside those the loader thread reads in their
place, and each heap keeps its own high-water mark. Moving 1,000 adapters through 32 slots grew
the process by 3.2-3.4 GiB in 4 minutes that way (the host tier holds 2.35), and by 7-77 MiB in
one arena (benchmarks/RESULTS.md). The limit only stops new arenas: threads that allocated
before it keep theirs, and a thread started after it takes one of those in turn, so it must
come first. `loraserve serve` sets it before it starts any thread, and `load_base_model` before
transformers' loading threads and torch's OpenMP team (for a process that started no threads
of its own first); Ray starts its replicas with `MALLOC_ARENA_MAX=1` in their environment
instead, since Ray's own threads run before any of loraserve's code. A program that started
allocating threads first is warned (`warn_if_arenas_came_first`). It holds on every device
(a GPU server's host tier churns too); keeping freed memory is for CPU engines, whose
activations come from malloc.

Knows nothing about models or tensors. Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters and the values set.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_FREED = (
    (M_MMAP_MAX, 0),  # no block mapped on its own
    (M_TOP_PAD, 64 << 20),
    (M_TRIM_THRESHOLD, 1 << 30),
)
ONE_ARENA = ((M_ARENA_MAX, 1),)
# The same limit for a process that some other program starts (glibc reads it at start-up).
ONE_ARENA_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks instead of returning them to the kernel (once
    per process); returns whether it applied."""
    return _mallopt(KEEP_FREED)


@functools.cache
def one_arena() -> bool:
    """Make every thread that has not allocated yet allocate from the arena of those that have
    (one arena, if no second thread has allocated; once per process); returns whether it
    applied."""
    return _mallopt(ONE_ARENA)


def malloc_arenas() -> int | None:
    """How many arenas glibc's malloc has made so far (from malloc_info(3)'s report); None
    where the C library cannot say."""
    try:
        libc = ctypes.CDLL(None)
        open_memstream, malloc_info, fclose, free = (
            libc.open_memstream, libc.malloc_info, libc.fclose, libc.free
        )  # fmt: skip
    except (OSError, AttributeError):
        return None
    open_memstream.restype = ctypes.c_void_p
    open_memstream.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t))
    malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    fclose.argtypes = (ctypes.c_void_p,)
    free.argtypes = (ctypes.c_void_p,)
    report, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = open_memstream(ctypes.byref(report), ctypes.byref(size))
    if not stream:
        return None
    malloc_info(0, stream)
    fclose(stream)  # sets report and size
    try:
        return ctypes.string_at(report, size.value).count(b"<heap nr=")
    finally:
        free(report)


@functools.cache
def warn_if_arenas_came_first() -> None:
    """Log a warning when threads allocated from arenas of their own before `one_arena`: the
    case of a program that embeds loraserve after starting threads of its own. Once per process
    (arenas are never given back: a later load would only say it again)."""
    arenas = malloc_arenas()
    if arenas is not None and arenas > 1:
        log.warning(
            "malloc already had %d arenas when loraserve limited it to one: threads allocated "
            "first, so memory freed in one is not reused by the others and the process can "
            "grow under adapter churn; start it with MALLOC_ARENA_MAX=1 in its environment",
            arenas,
        )


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = all([bool(mallopt(option, value)) for option, value in settings])
    if not applied:
        log.info("malloc kept its defaults: this C library refused mallopt")
    return applied
