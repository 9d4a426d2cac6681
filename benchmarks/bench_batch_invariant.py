"""What `batch_invariant` costs, side by side with the engine as it runs by default, and whether
each request's output then stays the same beside others.

Builds the benchmark's default random base and 32 adapters (`bench_multi_lora.py`'s), one engine
with the default settings (`default`) and one with `batch_invariant` (`invariant`), and runs
each workload through both, rounds alternating which goes first:

  batch        the default workload: 32 requests on 32 adapters, prompts of 64-128 tokens,
               64 new tokens each (generated tokens a second)
  one_stream   the workload's first request alone, on the base (generated tokens a second:
               decode steps of one row, where the invariant paths leave out the GEMV)
  long_prompt  one prompt of `--long-prompt` tokens, one new token (seconds to it: past the
               small-batch limit the invariant projections stay in the kernel, and past the
               attention kernel's chunk limit its attention too)

`outputs_alone`: whether the batch's first `--checked` requests generated the tokens each does
run alone, per engine (`invariant` must say true: its outputs do not depend on the batch).

    .venv/bin/python benchmarks/bench_batch_invariant.py \\
        --out benchmarks/results/batch_invariant.json
    .venv/bin/python benchmarks/bench_batch_invariant.py --compute-dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench_multi_lora import default_bench
from common import Workload
from engine_runs import build_engine, timed_run
from machine import machine_info

ENGINES = ("default", "invariant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-prompt", type=int, default=1984)
    parser.add_argument("--checked", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    bench = default_bench(args.compute_dtype)
    config, adapters, batch = bench.config, bench.adapters, bench.workload
    one = Workload(batch.prompts[:1], ("",), batch.new_tokens)
    generator = torch.Generator().manual_seed(1)
    long_ids = torch.randint(3, config.model.vocab_size, (args.long_prompt,), generator=generator)
    long_prompt = Workload((tuple(long_ids.tolist()),), ("",), 1)
    settings = bench.engine_settings()
    settings = settings.model_copy(
        update=dict(
            max_context=args.long_prompt + config.new_tokens,
            kv_cache_tokens=max(settings.kv_cache_tokens, args.long_prompt + 64),
        )
    )
    cores = {
        name: build_engine(settings.model_copy(update={"batch_invariant": invariant}), adapters)
        for name, invariant in zip(ENGINES, (False, True), strict=True)
    }
    runs = {
        "batch": (batch, True),
        "one_stream": (one, False),
        "long_prompt": (long_prompt, False),
    }
    seconds: dict[str, dict[str, list[float]]] = {w: {e: [] for e in ENGINES} for w in runs}
    batch_tokens: dict[str, list] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms every engine and workload up
        for workload_name, (workload, with_adapters) in runs.items():
            order = ENGINES if round_ % 2 == 0 else ENGINES[::-1]
            for name in order:
                run = timed_run(cores[name], workload, with_adapters)
                took, tokens = run.seconds, run.tokens
                if round_:
                    seconds[workload_name][name].append(took)
                if workload_name == "batch":
                    batch_tokens[name] = tokens
                print(f"round {round_} {workload_name:11s} {name:9s} {took:7.3f} s", flush=True)

    outputs_alone = {}
    for name in ENGINES:
        pairs = list(zip(batch.prompts, batch.adapters))[: args.checked]
        alone = [
            timed_run(cores[name], Workload((p,), (a,), batch.new_tokens), True).tokens[0]
            for p, a in pairs
        ]
        outputs_alone[name] = alone == batch_tokens[name][: args.checked]

    def rate(workload_name: str, name: str) -> float:
        workload = runs[workload_name][0]
        median = statistics.median(seconds[workload_name][name])
        if workload_name == "long_prompt":
            return median
        return len(workload.prompts) * workload.new_tokens / median

    figures = {
        w: {
            "unit": "seconds" if w == "long_prompt" else "generated tok/s",
            **{name: round(rate(w, name), 4) for name in ENGINES},
            "invariant_over_default": round(rate(w, "invariant") / rate(w, "default"), 3),
            "runs_s": {name: [round(s, 4) for s in seconds[w][name]] for name in ENGINES},
        }
        for w in runs
    }
    report = {
        "machine": machine_info(),
        "command": vars(args) | {"out": str(args.out) if args.out else None},
        "figures": figures,
        "outputs_alone": outputs_alone,
    }
    print(json.dumps({"figures": figures, "outputs_alone": outputs_alone}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
