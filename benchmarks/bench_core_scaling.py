"""How the decode step's kernels use the cores: alone, as one process's team, and side by side.

Times three pieces of work, each in three arrangements on the same machine:

- `projections`: a round of the 4-bit projections of a decode step of the benchmark's
  default model as the engine calls them (8 layers of 4 calls: q, k and v in one, o, gate and
  up in one, down; 32 rows, random NF4 bytes, each layer its own weights);
- `lm_head`: its fp32 output projection (32 rows against 32,000 x 1,024);
- `matmul`: torch's (MKL's) 2048^3 fp32 matmul, the work `bench_multi_lora` takes its peak
  from;

and each arrangement:

- `alone`: one process, one thread;
- `team`: one process, `--threads` threads (the kernels' parallel calls: one OpenMP team);
- `side_by_side`: `--threads` processes of one thread each, started together, each on its own
  copy of the work (nothing shared but the machine: its caches, memory and power).

`team / side_by_side` says what the kernels' parallel calls lose to the cores' own limits (a
team that splits every call against as many independent single-threaded processes); `alone /
side_by_side` per process says what one core loses when the others work too; and each piece's
GFLOP/s against `matmul`'s in the same arrangement says how near that work runs to the dense
matmul the benchmark's targets take as the peak.

    .venv/bin/python benchmarks/bench_core_scaling.py --threads 2 --out core_scaling.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench_multi_lora import DEFAULT
from loraserve.model.host_memory import keep_freed_memory
from loraserve.model.kernels import native
from machine import PEAK_SIZE, machine_info

ROWS = DEFAULT.num_requests  # rows of a decode step
ARRANGEMENTS = ("alone", "team", "side_by_side")
WORKS = ("projections", "lm_head", "matmul")
WORKER_TIMEOUT_S = 600  # a worker that crashed before its timings would be waited for forever


def layer_calls() -> list[tuple[int, list[int]]]:
    """(K, [N of each weight]) of the kernel calls of one decoder layer of the default model in
    a decode step: q, k and v share one call, as gate and up do (`linear.SharedInputGroup`)."""
    hidden, inner = DEFAULT.model.hidden_size, DEFAULT.model.intermediate_size
    return [(hidden, [hidden] * 3), (hidden, [hidden]), (hidden, [inner] * 2), (inner, [hidden])]


def flops(work: str) -> int:
    """The multiply-adds of one round of `work`, counted twice."""
    if work == "projections":
        calls = layer_calls() * DEFAULT.model.num_layers
        return sum(2 * ROWS * k * n for k, ns in calls for n in ns)
    if work == "lm_head":
        return 2 * ROWS * DEFAULT.model.hidden_size * DEFAULT.model.vocab_size
    return 2 * PEAK_SIZE**3


def make_round(work: str, seed: int) -> Callable[[], None]:
    """One round of `work` on this process's own inputs."""
    generator = torch.Generator().manual_seed(seed)
    ops = native()
    if ops is None:
        raise SystemExit("this CPU has no compiled kernels (no AVX2)")
    if work == "projections":
        code = torch.linspace(-1.0, 1.0, 16)  # the kernels' work does not depend on the values
        absent = torch.empty(0)

        def weights(k: int, ns: list[int]) -> tuple:
            """The arguments of `linear_4bit_group` for these weights, but x."""
            packed = [torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=generator)
                      for n in ns]  # fmt: skip
            absmax = [torch.rand(n * k // 64, generator=generator) for n in ns]
            return (packed, absmax, [code] * len(ns), [64] * len(ns), ns, [absent] * len(ns),
                    [absent] * len(ns), [absent] * len(ns), [0.0] * len(ns))  # fmt: skip

        calls = [
            (torch.randn(ROWS, k, generator=generator), weights(k, ns))
            for k, ns in layer_calls() * DEFAULT.model.num_layers
        ]

        def projections() -> None:
            for x, arguments in calls:
                ops.linear_4bit_group(x, *arguments, False)

        return projections
    if work == "lm_head":
        model = DEFAULT.model
        head = torch.randn(model.vocab_size, model.hidden_size, generator=generator)
        rows = torch.randn(ROWS, model.hidden_size, generator=generator)
        return lambda: ops.linear_f32(rows, head, None, False)
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, generator=generator) for _ in range(2))
    return lambda: torch.mm(a, b)


def run_worker(work: str, threads: int, rounds: int, seed: int, start, results) -> None:
    """Time `rounds` rounds of `work` on `threads` threads once every worker is ready; puts
    the seconds of each on `results`."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as an engine's process does: no fresh pages per call
    one_round = make_round(work, seed)
    one_round()  # warm-up: pages, code, the OpenMP team
    start.wait()
    seconds = []
    for _ in range(rounds):
        began = time.perf_counter()
        one_round()
        seconds.append(time.perf_counter() - began)
    results.put(seconds)


def measure(work: str, processes: int, threads: int, rounds: int) -> list[float]:
    """Median seconds of a round of `work` in each of `processes` processes of `threads`
    threads, all timing at once."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=run_worker, args=(work, threads, rounds, seed, start, results))
        for seed in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        medians = [statistics.median(results.get(timeout=WORKER_TIMEOUT_S)) for _ in workers]
    except queue.Empty:
        for worker in workers:
            worker.kill()
        raise SystemExit(f"a {work} worker gave no timings in {WORKER_TIMEOUT_S} s") from None
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise SystemExit(f"a {work} worker exited with {worker.exitcode}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per arrangement")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    layouts = {"alone": (1, 1), "team": (1, args.threads), "side_by_side": (args.threads, 1)}
    gflops: dict[str, dict[str, float]] = {work: {} for work in WORKS}
    for _ in range(args.repeats):  # arrangements interleaved: a noisy machine's drift spread
        for work in WORKS:
            for arrangement, (processes, threads) in layouts.items():
                seconds = measure(work, processes, threads, args.rounds)
                rate = processes * flops(work) / statistics.median(seconds) / 1e9
                best = gflops[work].get(arrangement, 0.0)
                gflops[work][arrangement] = max(best, rate)
    report = {
        "machine": machine_info(),
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "gflops": gflops,  # all processes together; the best of `repeats` medians
        "team_over_side_by_side": {w: g["team"] / g["side_by_side"] for w, g in gflops.items()},
        "alone_over_side_by_side_per_process": {
            w: g["alone"] * args.threads / g["side_by_side"] for w, g in gflops.items()
        },
        "over_matmul": {
            w: {a: gflops[w][a] / gflops["matmul"][a] for a in ARRANGEMENTS} for w in WORKS
        },
    }
    print(f"{'GFLOP/s':<12}" + "".join(f"{a:>14}" for a in ARRANGEMENTS))
    for work in WORKS:
        print(f"{work:<12}" + "".join(f"{gflops[work][a]:>14.1f}" for a in ARRANGEMENTS))
    for key in ("team_over_side_by_side", "alone_over_side_by_side_per_process"):
        print(f"{key}: " + ", ".join(f"{w} {v:.3f}" for w, v in report[key].items()))
    for work in ("projections", "lm_head"):
        ratios = report["over_matmul"][work]
        print(f"{work} / matmul: " + ", ".join(f"{a} {ratios[a]:.3f}" for a in ARRANGEMENTS))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
