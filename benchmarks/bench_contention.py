"""Decode steps beside a busy process: every compute thread against the thread governor.

Steps the benchmark's default base workload (32 rows, NF4, fp32 compute) on the engine directly,
first on the quiet machine, then beside a neighbour that keeps one CPU busy (`yes > /dev/null`),
each time with the decode steps' threads fixed at the configured count (`adaptive_threads`
off) and governed (on), the two alternating. Reports each run's median decode step, the
median of the parallel ops' waits per step, and the thread count the governor ended on.

    .venv/bin/python benchmarks/bench_contention.py --rounds 2 \
        --out benchmarks/results/contention.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import transformers

from engine_runs import Trace, submit
from loraserve.engine.core import EngineCore
from loraserve.model.compute_team import DecodeThreads, ThreadGovernor, team_wait_seconds
from machine import machine_info
from profile_step import base_workload, warm_base_engine

NEIGHBOUR = "exec yes > /dev/null"


@dataclass(frozen=True)
class Run:
    neighbour: bool
    governed: bool
    decode_step_ms_p50: float
    team_wait_ms_p50: float
    final_threads: int


def decode_run(core: EngineCore, new_tokens: int, governed: bool, neighbour: bool) -> Run:
    """One workload from a fresh governor; the prefill step is not counted."""
    core.decode_threads = DecodeThreads(ThreadGovernor(core.max_threads)) if governed else None
    submit(core, Trace(), base_workload(new_tokens), with_adapters=False)
    core.step()  # the prefill
    steps, waits = [], []
    while core.has_work():
        waited, started = team_wait_seconds() or 0.0, time.perf_counter()
        core.step()
        steps.append(time.perf_counter() - started)
        waits.append((team_wait_seconds() or 0.0) - waited)
    final = core.decode_threads.threads if core.decode_threads is not None else core.max_threads
    return Run(neighbour, governed, statistics.median(steps) * 1e3,
               statistics.median(waits) * 1e3, final)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    core = warm_base_engine(base_workload(args.new_tokens))
    runs: list[Run] = []
    for neighbour in (False, True):
        busy = subprocess.Popen(NEIGHBOUR, shell=True) if neighbour else None
        try:
            for _ in range(args.rounds):
                for governed in (False, True):
                    run = decode_run(core, args.new_tokens, governed, neighbour)
                    runs.append(run)
                    print(
                        f"neighbour={neighbour} governed={governed}: decode step "
                        f"{run.decode_step_ms_p50:.1f} ms, waits {run.team_wait_ms_p50:.2f} "
                        f"ms/step, ended on {run.final_threads} thread(s)",
                        flush=True,
                    )
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    if args.out:
        record = {"machine": machine_info(), "max_threads": core.max_threads,
                  "new_tokens": args.new_tokens, "neighbour": NEIGHBOUR,
                  "runs": [asdict(run) for run in runs]}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
