"""The decode steps' thread count under other processes' load: the governor's decisions, fed
step times and waits with explicit clocks, and how they reach torch's thread count."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loraserve.model.compute_team import DecodeThreads, ThreadGovernor, team_wait_seconds
from loraserve.model.kernels import native

STEP = 0.05  # seconds a step takes in these tests
QUIET, TAKEN = 0.001, 0.3  # a step's waits, as a share of its time, on free and on taken cores
ROWS = 32


def _governor(max_threads: int = 4) -> ThreadGovernor:
    return ThreadGovernor(
        max_threads, window_s=2 * STEP, contended_share=0.1, margin=0.05, first_hold_s=1.0,
        max_hold_s=4.0,
    )  # fmt: skip


def _window(governor: ThreadGovernor, now: float, waits: float = QUIET, speed: float = 1.0) -> int:
    """Steps of ROWS rows each, `speed` times as fast as STEP, for one whole window."""
    step = STEP / speed
    for _ in range(math.ceil(governor.window_s / step - 1e-9) - 1):
        governor.record(step, waits * step, ROWS, now)
    return governor.record(step, waits * step, ROWS, now)


def test_free_cores_keep_every_thread():
    governor = _governor()
    assert [_window(governor, t) for t in range(20)] == [4] * 20


def test_no_decision_before_a_window_of_steps():
    governor = _governor()
    assert governor.record(STEP, TAKEN * STEP, ROWS, 0.0) == 4
    assert governor.record(STEP, TAKEN * STEP, ROWS, 0.0) == 3


def test_taken_cores_try_one_thread_fewer_and_keep_it_while_it_is_faster():
    governor = _governor()
    # each count runs 1.2x as fast as the one above it: a trial, its verdict, the next trial...
    speeds = [1.0, 1.2, 1.2, 1.44, 1.44, 1.73, 1.73, 1.73]
    counts = [_window(governor, 0.1 * i, TAKEN, speed) for i, speed in enumerate(speeds)]
    assert counts == [3, 3, 2, 2, 1, 1, 1, 1]  # never below one


def test_a_fewer_threads_trial_that_is_not_faster_is_undone_and_retried_ever_later():
    governor = _governor(max_threads=2)
    trials = []
    now = 0.0
    while len(trials) < 5:
        if _window(governor, now, TAKEN) == 1:  # a trial: as slow as two threads
            trials.append(now)
            now += 0.01
            assert _window(governor, now, 0.0) == 2  # not faster: undone
        now += 0.25
    assert [round(b - a) for a, b in itertools.pairwise(trials)] == [1, 2, 4, 4]


def test_a_lowered_count_is_probed_after_its_hold_and_kept_only_if_faster():
    governor = _governor(max_threads=2)
    assert _window(governor, 0.0, TAKEN) == 1  # trial
    assert _window(governor, 0.0, 0.0, speed=2.0) == 1  # twice as fast: kept, probe after 1 s
    assert _window(governor, 0.5, 0.0, speed=2.0) == 1
    assert _window(governor, 1.0, 0.0, speed=2.0) == 2  # the probe
    assert _window(governor, 1.0, TAKEN, speed=1.0) == 1  # slower: undone for 1 s, then 2 s
    assert _window(governor, 1.5, 0.0, speed=2.0) == 1
    assert _window(governor, 2.0, 0.0, speed=2.0) == 2  # the probe
    assert _window(governor, 2.0, TAKEN, speed=1.0) == 1  # slower again
    assert _window(governor, 3.5, 0.0, speed=2.0) == 1
    assert _window(governor, 4.0, 0.0, speed=2.0) == 2  # the probe
    assert _window(governor, 4.0, QUIET, speed=3.0) == 2  # the neighbour left: kept
    assert [_window(governor, 4.0 + t, QUIET, speed=3.0) for t in range(5)] == [2] * 5


def test_time_per_row_not_per_step_decides():
    governor = _governor(max_threads=2)
    assert _window(governor, 0.0, TAKEN) == 1
    # the same step time with twice the rows (requests joined): twice as fast per row
    governor.record(STEP, 0.0, 2 * ROWS, 0.0)
    assert governor.record(STEP, 0.0, 2 * ROWS, 0.0) == 1


def test_one_thread_stays_one_and_no_threads_is_refused():
    governor = _governor(max_threads=1)
    assert [_window(governor, t, TAKEN) for t in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 1"):
        ThreadGovernor(0)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_decode_steps_run_on_the_governed_count_and_leave_every_thread_after(restore_threads):
    governor = ThreadGovernor(3, window_s=0.0, contended_share=-1.0, margin=-math.inf)
    threads = DecodeThreads(governor)  # every window "taken", every change "pays"
    torch.set_num_threads(3)
    seen = [threads.run(ROWS, torch.get_num_threads) for _ in range(4)]
    assert seen == [3, 2, 2, 1]  # a trial, its verdict, the next trial
    assert torch.get_num_threads() == 3  # between decode steps: the configured count
    with pytest.raises(RuntimeError, match="step failed"):
        threads.run(ROWS, _failing_step)
    assert torch.get_num_threads() == 3


def _failing_step() -> None:
    assert torch.get_num_threads() == 1
    raise RuntimeError("step failed")


@pytest.mark.skipif(native() is None, reason="no compiled kernels to count waits")
def test_team_waits_count_the_calls_a_team_ran_and_only_grow(restore_threads):
    torch.set_num_threads(2)
    ops = native()
    calls, seconds = ops.team_waits()
    x, weight = torch.randn(8, 256), torch.randn(512, 256)
    for _ in range(3):
        ops.linear_f32(x, weight, None)
    after_calls, after_seconds = ops.team_waits()
    assert after_calls == calls + 3
    assert after_seconds >= seconds >= 0.0
    assert team_wait_seconds() >= after_seconds
