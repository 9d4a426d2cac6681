"""The CPUs a process may use: cgroup CPU quotas read from real files laid out as cgroup v2 and
v1 mount them, capped affinity counts, and torch's thread count set from them."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraserve.model.cpus import (
    UsableCpus,
    cgroup_cpu_quota,
    in_passing_thread,
    serial_executor,
    serial_thread,
    set_compute_threads,
    usable_cpus,
)
from loraserve.model.kernels import native


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_takes_the_tightest_limit_on_the_way_up(tmp_path):
    _write(tmp_path / "kubepods" / "cpu.max", "400000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")

    assert cgroup_cpu_quota(tmp_path, "0::/kubepods/pod1/ctr\n") == 1.5
    assert cgroup_cpu_quota(tmp_path, "0::/kubepods\n") == 4.0


def test_v2_without_a_limit_anywhere_is_none(tmp_path):
    _write(tmp_path / "user.slice" / "cpu.max", "max 100000\n")

    assert cgroup_cpu_quota(tmp_path, "0::/user.slice\n") is None
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None  # no cpu.max at all


def test_v1_reads_the_cpu_controllers_mount(tmp_path):
    mount = tmp_path / "cpu,cpuacct"
    _write(mount / "docker" / "cpu.cfs_quota_us", "300000\n")
    _write(mount / "docker" / "cpu.cfs_period_us", "100000\n")
    _write(mount / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    _write(mount / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    membership = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"

    assert cgroup_cpu_quota(tmp_path, membership) == 3.0


def test_v1_split_controllers_and_unlimited(tmp_path):
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")

    assert cgroup_cpu_quota(tmp_path, "2:cpuacct:/\n1:cpu:/\n") is None


def test_unreadable_or_foreign_files_are_no_limit(tmp_path):
    _write(tmp_path / "a" / "cpu.max", "lots\n")
    _write(tmp_path / "b" / "cpu.max", "100000 0\n")

    assert cgroup_cpu_quota(tmp_path, "0::/a\n") is None
    assert cgroup_cpu_quota(tmp_path, "0::/b\n") is None


def test_a_path_above_the_namespace_reads_the_mount_only(tmp_path):
    _write(tmp_path / "cpu.max", "200000 100000\n")
    _write(tmp_path.parent / "cpu.max", "100000 100000\n")  # outside the mount: never read

    assert cgroup_cpu_quota(tmp_path, "0::/../../elsewhere\n") == 2.0


@pytest.mark.parametrize(
    ("affinity", "quota", "count"),
    [(8, None, 8), (8, 1.5, 2), (8, 0.2, 1), (4, 16.0, 4), (2, 2.0, 2)],
)
def test_count_is_the_affinity_capped_by_the_quota_rounded_up(affinity, quota, count):
    assert UsableCpus(affinity, quota).count == count


def test_this_process_has_at_least_one_cpu():
    cpus = usable_cpus()
    assert 1 <= cpus.count <= cpus.affinity


def test_set_compute_threads_sets_torch_and_by_default_caps_its_count():
    before = torch.get_num_threads()
    try:
        assert set_compute_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert set_compute_threads(None) == 1  # torch's count (1 now) is within the CPUs
        torch.set_num_threads(usable_cpus().count + 3)  # as OMP_NUM_THREADS past the quota
        assert set_compute_threads(None) == usable_cpus().count == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _process_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _parallel_work() -> None:
    """What helper threads run: elementwise ops and an MKL GEMM big enough to go parallel, and
    a compiled kernel."""
    x = torch.randn(512, 1024)
    (x * x).sum()
    x @ x.T
    ops = native()
    if ops is not None:
        ops.linear_f32(x, x, None)


def _threads_started_by(work: Callable[[], None]) -> int:
    """How many OS threads `work` starts and leaves running when run on a fresh thread (alive
    while they are counted): a thread that computes in parallel keeps an OpenMP team."""
    counts: list[int] = []
    counted, release = threading.Event(), threading.Event()

    def run() -> None:
        try:
            before = _process_threads()
            work()
            counts.append(len(_process_threads() - before))
        finally:
            counted.set()
        release.wait()

    thread = threading.Thread(target=run)
    thread.start()
    counted.wait()
    release.set()
    thread.join()
    return counts[0]


@pytest.fixture
def two_compute_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(native() is None, reason="serial_thread needs the compiled kernels")
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_serial_thread_computes_without_a_team_of_its_own(two_compute_threads):
    assert _threads_started_by(_parallel_work) >= 1  # what it prevents
    assert _threads_started_by(lambda: (serial_thread(), _parallel_work())) == 0


@pytest.mark.skipif(native() is None, reason="serial_thread needs the compiled kernels")
def test_serial_executor_threads_are_serial(two_compute_threads):
    with serial_executor(1) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2  # the caller's thread keeps its count


def test_in_passing_thread_returns_raises_and_ends_its_thread(two_compute_threads):
    async def main() -> tuple[int, list[str]]:
        result = await in_passing_thread(lambda a, b: a + b, 2, 3)
        with pytest.raises(ValueError, match="bad"):
            await in_passing_thread(_raise, ValueError("bad"))
        passing = [t for t in threading.enumerate() if t.name.startswith("loraserve-passing")]
        for thread in passing:
            thread.join(30)
        return result, [t.name for t in passing if t.is_alive()]

    assert asyncio.run(main()) == (5, [])


def _raise(error: Exception) -> None:
    raise error
