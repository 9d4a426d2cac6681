"""How many compute threads each decode step gets while other processes share the CPUs.

Every parallel op ends when the slowest thread of its team does. When another process keeps a
core busy, the scheduler runs one of the team's threads only part of the time, and each op's
calling thread waits for it at the op's end: on 2 cores beside `yes > /dev/null`, a decode step
took 108-161 ms on two threads and 95-103 ms governed (52-54 ms on two when quiet;
benchmarks/RESULTS.md). The compiled kernels count that wait (`team_waits`); while it takes a
tenth of the decode steps' time or more, `ThreadGovernor` tries one thread fewer, keeps it if
the steps get faster, and probes one more again after a hold that doubles each time a change
did not pay.

Only decode steps are governed, and only while they run: their ops (the compiled kernels,
elementwise torch ops) give the same numbers on any number of threads, so a neighbour never
changes an output. Steps with a prefill run on every thread, since a GEMM's result may depend
on its team's size.

Knows nothing about the engine or models: the engine says which steps are decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from loraserve.model.kernels import native

T = TypeVar("T")

# The waits' share of the steps' time from which fewer threads are tried (quiet: about 0.003 of
# a decode step; beside a busy process: 0.15-0.3).
CONTENDED_SHARE = 0.10
MARGIN = 0.05  # a change of count stays only if its time per row is this much lower
WINDOW_S = 0.25  # decode steps' time per decision
FIRST_HOLD_S = 1.0  # before the same change is tried again; doubles each time it did not pay
MAX_HOLD_S = 32.0


def team_wait_seconds() -> float | None:
    """Seconds the calling threads of the compiled kernels' parallel ops have waited, in all, for
    the rest of their teams at the ops' ends; None without the compiled kernels."""
    ops = native()
    if ops is None:
        return None
    _, seconds = ops.team_waits()
    return float(seconds)


class ThreadGovernor:
    """The thread count for the next decode step, from the decode steps' times and waits.

    Decides once per `window_s` of steps, comparing windows by their time per row. At a count
    whose ops wait for their teams `contended_share` of the time or more, one thread fewer is
    tried for a window; below the configured count, one more is probed once a hold has passed.
    Either change stays only if its window's time per row beats the window before it by
    `margin`; one that does not is undone, and its hold doubles (up to `max_hold_s`) before it
    is tried again. Times are the caller's (`now`), so decisions can be replayed in tests.
    """

    def __init__(
        self,
        max_threads: int,
        *,
        window_s: float = WINDOW_S,
        contended_share: float = CONTENDED_SHARE,
        margin: float = MARGIN,
        first_hold_s: float = FIRST_HOLD_S,
        max_hold_s: float = MAX_HOLD_S,
    ) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.max_threads = max_threads
        self.threads = max_threads
        self.window_s = window_s
        self.contended_share = contended_share
        self.margin = margin
        self.first_hold_s = first_hold_s
        self.max_hold_s = max_hold_s
        self._holds = {-1: first_hold_s, 1: first_hold_s}  # per direction of change
        self._not_before = {-1: 0.0, 1: 0.0}
        self._trial: tuple[int, float] | None = None  # (direction, time per row before it)
        self._step_s = self._waited_s = 0.0
        self._rows = 0

    def record(self, step_s: float, waited_s: float, rows: int, now: float) -> int:
        """One decode step of `rows` rows at `threads` took step_s, of which its ops' calling
        thread waited waited_s for the rest of their teams; returns the count for the next."""
        self._step_s += step_s
        self._waited_s += waited_s
        self._rows += rows
        if self._step_s < self.window_s or self._rows == 0:
            return self.threads
        per_row = self._step_s / self._rows
        contended = self._waited_s >= self.contended_share * self._step_s
        self._step_s = self._waited_s = 0.0
        self._rows = 0
        if self._trial is not None:
            direction, before = self._trial
            self._trial = None
            if per_row < before * (1 - self.margin):  # it paid: the other way may, later
                self._holds[direction] = self.first_hold_s
                self._not_before[-direction] = now + self._holds[-direction]
            else:
                self.threads -= direction
                self._not_before[direction] = now + self._holds[direction]
                self._holds[direction] = min(2 * self._holds[direction], self.max_hold_s)
        elif contended and self.threads > 1 and now >= self._not_before[-1]:
            self._trial = (-1, per_row)
            self.threads -= 1
        elif self.threads < self.max_threads and now >= self._not_before[1]:
            self._trial = (1, per_row)
            self.threads += 1
        return self.threads


class DecodeThreads:
    """Runs the calling thread's decode steps on the count a `ThreadGovernor` gives, and feeds
    it each step's time, rows and waits. Between decode steps the thread keeps the governor's
    `max_threads`, so nothing else it runs (a prefill, sampling, an engine built after this one
    on the same thread) inherits a lowered count."""

    def __init__(self, governor: ThreadGovernor) -> None:
        self.governor = governor

    @property
    def threads(self) -> int:
        """The count the next decode step gets."""
        return self.governor.threads

    def run(self, rows: int, forward: Callable[[], T]) -> T:
        """forward() as a decode step of `rows` rows."""
        _set_threads(self.governor.threads)
        waited_before = team_wait_seconds() or 0.0
        started = time.perf_counter()
        try:
            return forward()
        finally:
            step_s = time.perf_counter() - started
            waited = (team_wait_seconds() or 0.0) - waited_before
            _set_threads(self.governor.max_threads)
            self.governor.record(step_s, waited, rows, time.monotonic())


def _set_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
