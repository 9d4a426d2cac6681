"""How many threads the model's CPU arithmetic gets: no more than the CPUs this process may use.

torch starts one compute thread per physical core it sees (or `OMP_NUM_THREADS`, which Ray sets
for its replicas), and knows nothing of a container's CPU quota (cgroup `cpu.max`, or
`cpu.cfs_quota_us` under cgroup v1): a pod limited to 2 CPUs on a 64-core node would run 32 or
64 threads that the quota then stalls, each step waiting at every op's end for the slowest.
`usable_cpus` reads the affinity mask and the quota; `set_compute_threads` hands torch (and the
compiled kernels, which share its thread pool) a count within them.

Only one thread should compute in parallel: the engine's. Every thread that runs a parallel
torch op keeps an OpenMP team of its own, and once a process holds more OpenMP threads than
CPUs, libgomp stops spinning between parallel regions for every team, so each of the engine's
parallel ops waits for its threads to wake (on 2 CPUs a multi-LoRA decode step took 1.14x the
time; docs/performance.md). `serial_thread` keeps a helper thread's ops on the
thread itself, `serial_executor` makes pools of such threads, and `in_passing_thread` runs work
that should use every CPU (loading the model) on a thread that ends with it, taking its team
along.

Knows nothing about models or the engine: the composition root decides when to call it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from loraserve.model.kernels import native

T = TypeVar("T")

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class UsableCpus:
    """affinity: CPUs the scheduler may run this process on; quota: the cgroup's CPU limit in
    CPUs (None: unlimited or unknown)."""

    affinity: int
    quota: float | None

    @property
    def count(self) -> int:
        """The whole CPUs the process can keep busy: the affinity, capped by the quota rounded
        up (a 1.5-CPU quota still lets two threads run, each part of the time)."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota)))


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest CPU limit, in CPUs, on this process's cgroup and those above it (v2 and v1
    layouts); None when no limit is set or the files cannot be read. membership: the text of
    /proc/self/cgroup (read when None)."""
    try:
        text = PROC_CGROUP.read_text() if membership is None else membership
    except OSError:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        # a path above the cgroup namespace's root shows as "/../..": read from the mount down
        relative = "" if ".." in Path(path).parts else path.lstrip("/")
        if controllers == "":  # cgroup v2: one unified hierarchy
            limits += _limits_up(root, relative, _v2_limit)
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if mount.is_dir():
                    limits += _limits_up(mount, relative, _v1_limit)
                    break
    return min(limits, default=None)


def _limits_up(mount: Path, relative: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits `read` finds in the cgroup at mount/relative and each of its ancestors."""
    found = []
    directory = mount / relative
    while True:
        limit = read(directory)
        if limit is not None:
            found.append(limit)
        if directory == mount or mount not in directory.parents:
            return found
        directory = directory.parent


def _v2_limit(directory: Path) -> float | None:
    """cpu.max: "<quota> <period>" in microseconds, or "max <period>"."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(directory: Path) -> float | None:
    """cpu.cfs_quota_us (-1: unlimited) over cpu.cfs_period_us."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus() -> UsableCpus:
    """This process's CPUs: its affinity mask and its cgroup's quota."""
    return UsableCpus(len(os.sched_getaffinity(0)), cgroup_cpu_quota())


def set_compute_threads(threads: int | None) -> int:
    """Give torch `threads` compute threads (None: torch's own count, capped by
    `usable_cpus().count`); returns the count. Threads that start torch work after this call
    take it too (the engine's step thread)."""
    cpus = usable_cpus()
    count = threads or min(torch.get_num_threads(), cpus.count)
    torch.set_num_threads(count)
    quota = "no CPU quota" if cpus.quota is None else f"a CPU quota of {cpus.quota:g}"
    log.info("%d compute threads (%d CPUs in the affinity mask, %s)", count, cpus.affinity, quota)
    return count


def serial_thread() -> None:
    """From now on, torch ops called from this thread run on it alone (no OpenMP team of its
    own). Without the compiled kernels it does nothing: torch has no per-thread setting."""
    ops = native()
    if ops is not None:
        ops.serial_thread()


def serial_executor(workers: int | None = None, name: str = "loraserve") -> ThreadPoolExecutor:
    """A thread pool whose threads are `serial_thread`s: for work beside the engine's steps."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=serial_thread)


def in_passing_thread(fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """fn(*args) on a thread of its own that ends when the call returns, awaitable from the
    running event loop: its parallel ops use every compute thread and leave no team behind."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="loraserve-passing")
    try:
        return asyncio.wrap_future(executor.submit(fn, *args))
    finally:
        executor.shutdown(wait=False)
