"""What a CUDA graph of the engine's decode forward would save, and whether it can be captured.

A decode step on a GPU is host-bound: hundreds of small kernel launches, each costing more host
time than the GPU spends on it (RESULTS.md, the H200 sections). A CUDA graph replays a captured
sequence of launches for the cost of one. This probe takes one real decode step of the
benchmark's default model (the rows the engine itself built), and times, on the same inputs:

- `forward`: the runner's whole call: on a GPU its decode graphs (`model/decode_graphs.py`:
  the rows written into a graph's static buffer, the graph replayed, the logits copied out),
  elsewhere the inputs built on the host and the model run;
- `run`: the model alone, eagerly, over inputs built once (`ModelRunner.prepare` / `run`);
- `replay`: that model call captured in a CUDA graph here and replayed (no padding),

each the median of `--repeats` synchronised calls, and checks the replay's logits against the
eager run's. A replay writes the same keys and values to the same pool slots as the eager call,
so repeating either leaves the cache as one call did. Configurations: 32 rows on the base, 32
rows each on its own adapter (the gathered LoRA form), one row on the base. On a machine without
CUDA only the eager figures are printed.

So `run` against `replay` is what a graph saves a step, and `forward` against `replay` what
the engine's graphs pay beside it (the copy in and out, the padding to their shapes).

    python3 benchmarks/probe_decode_graph.py --out graph.json      # on a GPU machine
    .venv/bin/python benchmarks/probe_decode_graph.py --only base-1  # the eager path, here
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
import transformers

from bench_multi_lora import DEFAULT, BenchConfig
from engine_runs import Trace, submit
from loraserve.engine.core import EngineCore
from loraserve.model.loading import DTYPES
from loraserve.model.runner import RowInput
from profile_step import base_workload, timed_steps, warm_base_engine, warm_lora_engine

CONFIGS = ("base-32", "lora-32", "base-1")


def median_ms(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median wall time of `call`, synchronised with the device after each."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def decode_rows(core: EngineCore, before: int) -> list[RowInput]:
    """The rows of the engine's decode step after `before` decode steps, in slot order (as the
    runner lays them out); the step runs in full."""
    runner = core.runner
    for _ in range(before):
        core.step()
    seen: list[list[RowInput]] = []
    forward = runner.forward
    runner.forward = lambda rows: seen.append(rows) or forward(rows)  # type: ignore[method-assign]
    try:
        core.step()
    finally:
        del runner.forward  # the class's method again
    return sorted(seen[0], key=lambda row: row.lora_slot)


def probe(core: EngineCore, rows: list[RowInput], repeats: int) -> dict[str, object]:
    runner, device = core.runner, core.device
    inputs = runner.prepare(rows)
    reference = runner.run(inputs)  # [B, V]; also builds what `inputs` builds lazily
    figures: dict[str, object] = {
        "rows": len(rows),
        "context_longest": max(r.start + len(r.tokens) for r in rows),
        "forward_ms": median_ms(lambda: runner.forward(rows), device, repeats),
        "run_ms": median_ms(lambda: runner.run(inputs), device, repeats),
    }
    if device.type != "cuda":
        return figures
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph asks
        for _ in range(3):
            runner.run(inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = runner.run(inputs)
    except Exception as error:  # what stops a capture is this probe's finding
        figures["capture_error"] = f"{type(error).__name__}: {error}"[:2000]
        return figures
    graph.replay()
    torch.cuda.synchronize(device)
    figures["replay_max_abs_diff"] = (captured - reference).abs().max().item()
    figures["replay_same_argmax"] = bool(torch.equal(captured.argmax(-1), reference.argmax(-1)))
    replay_ms = median_ms(graph.replay, device, repeats)
    figures["replay_ms"] = replay_ms
    figures["run_over_replay"] = cast(float, figures["run_ms"]) / replay_ms
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=8, help="each row's tokens to generate")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    bench: BenchConfig = replace(DEFAULT, device=args.device, compute_dtype=args.compute_dtype)
    results = {}
    for name in args.only:
        if name == "lora-32":
            core, workload = warm_lora_engine(args.new_tokens, bench)
        else:
            requests = int(name.split("-")[1])
            workload = base_workload(args.new_tokens, requests, bench)
            core = warm_base_engine(workload, bench.model, bench)
        submit(core, Trace(), workload, with_adapters=name == "lora-32")
        core.step()  # the prefill
        rows = decode_rows(core, before=2)
        results[name] = probe(core, rows, args.repeats)
        timed_steps(core, Trace())  # the rest of the workload, leaving the engine idle
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(args.device), "compute_dtype": args.compute_dtype,
                       "configs": results}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
