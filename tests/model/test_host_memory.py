"""malloc keeps what a forward frees: the next allocation of the same size faults no page in;
and every thread allocates from one arena, set before the server's and the load's threads start.

Each case runs in a fresh interpreter, whose malloc has its defaults until the code under test
changes them (this test process may have changed its own already). Linux with glibc only.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.api.server_process import free_port

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
    from loraserve.model.host_memory import keep_freed_memory, one_arena
    if sys.argv[1] == "keep":
        assert keep_freed_memory() and one_arena()
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


# Defines arenas(): how many malloc arenas (heaps) the process has, from malloc_info(3)'s report.
ARENAS = textwrap.dedent(
    """
    import ctypes, re, sys, tempfile, threading

    def arenas():
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
        libc.fclose.argtypes = (ctypes.c_void_p,)
        libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
        with tempfile.NamedTemporaryFile("r") as report:
            stream = libc.fopen(report.name.encode(), b"w")
            libc.malloc_info(0, stream)
            libc.fclose(stream)
            return len(re.findall("<heap nr=", report.read()))
    """
)


# Records host_memory's warnings; prints "quiet", "warned" (once) or "warned-again" at exit.
WARNINGS = textwrap.dedent(
    """
    import atexit, logging
    warned = []
    handler = logging.Handler()
    handler.emit = warned.append
    logging.getLogger("loraserve.model.host_memory").addHandler(handler)
    atexit.register(lambda: print(["quiet", "warned"][len(warned)] if len(warned) < 2
                                  else "warned-again"))
    """
)


def run_probe(script: str, *args: str, warnings: bool = False) -> list[str]:
    """The words `script` prints, run with `args` after ARENAS (and WARNINGS if asked)."""
    prelude = ARENAS + (WARNINGS if warnings else "")
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout, result.stderr[-3000:]
    return result.stdout.split()


def test_serve_puts_the_threads_it_starts_on_one_arena(tmp_path: Path) -> None:
    """`loraserve serve` starts gRPC, its executors and the loading thread (which fails here:
    the directory has a config and no weights, so the server stops with status 1); every one of
    them allocates from the main arena. Without the setting first, this process had 9."""
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    status, count = run_probe(
        """
        from loraserve import cli
        status = cli.main(["serve", "--model", sys.argv[1], "--port", sys.argv[2]])
        print(status, arenas())
        """,
        str(tmp_path),
        str(free_port()),
    )
    assert (status, count) == ("1", "1")


def test_loading_a_model_puts_its_threads_and_later_ones_on_one_arena(model_dirs) -> None:
    """`load_base_model` sets the limit before transformers' loading threads and torch's
    OpenMP team allocate, so a thread started after (the adapter loader) shares their arena.
    Without it this process had 4 (a loader thread then takes one of them in turn)."""
    count, warned = run_probe(
        """
        import torch
        from loraserve.model.loading import load_base_model
        load_base_model(sys.argv[1], "nf4", "fp32", "cpu")
        torch.ones(512, 512).mm(torch.ones(512, 512))  # on every OpenMP thread
        worker = threading.Thread(target=lambda: bytearray(1 << 20))
        worker.start()
        worker.join()
        print(arenas())
        """,
        str(model_dirs["llama"]),
        warnings=True,
    )
    assert (count, warned) == ("1", "quiet")


def test_a_program_whose_threads_allocated_first_is_warned(model_dirs) -> None:
    """An embedding program that started an allocating thread before loading the model has two
    arenas for good; the first load says so, naming the environment variable that prevents it,
    and a second load (a benchmark's next engine) does not say it again."""
    count, warned = run_probe(
        """
        worker = threading.Thread(target=lambda: bytearray(1 << 20))
        worker.start()
        worker.join()
        from loraserve.model.loading import load_base_model
        load_base_model(sys.argv[1], "nf4", "fp32", "cpu")
        load_base_model(sys.argv[1], "nf4", "fp32", "cpu")
        print(arenas())
        """,
        str(model_dirs["llama"]),
        warnings=True,
    )
    assert (count, warned) == ("2", "warned")


def test_the_arena_count_is_malloc_info_s() -> None:
    counts = run_probe(
        """
        from loraserve.model.host_memory import malloc_arenas
        print(arenas(), malloc_arenas())
        worker = threading.Thread(target=lambda: bytearray(1 << 20))
        worker.start()
        worker.join()
        print(arenas(), malloc_arenas())
        """
    )
    assert counts == ["1", "1", "2", "2"]
