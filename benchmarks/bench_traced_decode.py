"""What `traced_decode_records` gives: CPU decode steps replayed from TorchScript records of the
forward, side by side with the same engine running every step eagerly, and whether the outputs
match.

Builds the benchmark's default random base and 32 adapters (`bench_multi_lora.py`'s), and 8 DoRA
adapters of the same rank and targets, one engine with `traced_decode_records` at its default
(`traced`) and one with it 0 (`eager`), every adapter in a device slot, and runs each workload
through both, rounds alternating which goes first:

  one_stream       the default workload's first request alone, on the base, 64 new tokens
  four             its first 4 requests on the base
  base             its 32 requests on the base
  multi_lora       its 32 requests, each on its own adapter
  staggered        the same, request i generating 2 * (i + 1) tokens: the batch shrinks from 32
                   rows to one, a row every second step (`Workload.staggered`)
  dora_one_stream  its first request alone, on a DoRA adapter
  dora_multi       its 32 requests, each on its own adapter, every fourth a DoRA one (whose
                   terms the traced engine's steps apply to every row, gathered)

Figures: generated tokens a second (medians of `--repeats` rounds; round 0 warms both engines up
and is where `traced` records its forwards, one per range of row counts that take the same
paths through the projections (`linear.rows_alike`), with adapters or without, with terms or
without: its time is reported as `first_round_s`; `records` lists them), and
`outputs_identical`: whether both engines generated the same tokens for every request of every
round (greedy; they must: the same kernels).

    .venv/bin/python benchmarks/bench_traced_decode.py \\
        --out benchmarks/results/traced_decode_fp32.json
    .venv/bin/python benchmarks/bench_traced_decode.py --compute-dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from bench_multi_lora import TARGETS, default_bench
from common import Workload, prepare_lora_adapters
from engine_runs import build_engine, timed_run
from loraserve.config import EngineConfig
from machine import machine_info

ENGINES = ("traced", "eager")
DEFAULT_RECORDS = EngineConfig.model_fields["traced_decode_records"].default
DORA_ADAPTERS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    bench = default_bench(args.compute_dtype)
    config, batch = bench.config, bench.workload
    dora = prepare_lora_adapters(
        bench.model_dir, DORA_ADAPTERS, config.rank, config.alpha, TARGETS, dora=True
    )
    adapters = bench.adapters | {f"dora-{name}": path for name, path in dora.items()}
    dora_names = [f"dora-{name}" for name in dora]
    base = Workload(batch.prompts, ("",) * len(batch.prompts), batch.new_tokens)
    mixed = Workload(
        batch.prompts,
        tuple(dora_names[i // 4] if i % 4 == 0 else a for i, a in enumerate(batch.adapters)),
        batch.new_tokens,
    )
    dora_stream = Workload(batch.prompts[:1], (dora_names[0],), batch.new_tokens)
    settings = bench.engine_settings().model_copy(update={"device_slots": len(adapters)})
    cores = {
        name: build_engine(
            settings.model_copy(update={"traced_decode_records": records}),
            adapters,
            record_decode_steps=False,  # round 0 records, and times it
        )
        for name, records in zip(ENGINES, (DEFAULT_RECORDS, 0), strict=True)
    }
    traces = cores["traced"].runner.traces
    if traces is None:
        raise SystemExit("this machine's engine records no decode step (a GPU, or no kernels)")
    runs = {
        "one_stream": (base.head(1, batch.new_tokens), False),
        "four": (base.head(4, batch.new_tokens), False),
        "base": (base, False),
        "multi_lora": (batch, True),
        "staggered": (replace(batch, staggered=True), True),
        "dora_one_stream": (dora_stream, True),
        "dora_multi": (mixed, True),
    }
    seconds: dict[str, dict[str, list[float]]] = {w: {e: [] for e in ENGINES} for w in runs}
    first_round: dict[str, dict[str, float]] = {w: {} for w in runs}
    identical = True
    for round_ in range(args.repeats + 1):  # round 0 warms both engines up (and records)
        for workload_name, (workload, with_adapters) in runs.items():
            order = ENGINES if round_ % 2 == 0 else ENGINES[::-1]
            tokens = {}
            for name in order:
                run = timed_run(cores[name], workload, with_adapters)
                took, tokens[name] = run.seconds, run.tokens
                if round_:
                    seconds[workload_name][name].append(took)
                else:
                    first_round[workload_name][name] = round(took, 4)
                print(f"round {round_} {workload_name:15s} {name:6s} {took:7.3f} s", flush=True)
            identical = identical and tokens["traced"] == tokens["eager"]

    def rate(workload_name: str, name: str) -> float:
        workload = runs[workload_name][0]
        return workload.generated_tokens / statistics.median(seconds[workload_name][name])

    figures = {
        w: {
            "unit": "generated tok/s",
            **{name: round(rate(w, name), 2) for name in ENGINES},
            "traced_over_eager": round(rate(w, "traced") / rate(w, "eager"), 3),
            "runs_s": {name: [round(s, 4) for s in seconds[w][name]] for name in ENGINES},
            "first_round_s": first_round[w],
        }
        for w in runs
    }
    records = {
        "recorded": sorted(
            f"{k.rows.start}-{k.rows.stop - 1}{'+lora' if k.adapters else ''}"
            f"{'+terms' if k.terms else ''}"
            for k in traces.traces
        ),
        "untraceable": len(traces.untraceable),
    }
    report = {
        "machine": machine_info(),
        "command": vars(args) | {"out": str(args.out) if args.out else None},
        "figures": figures,
        "outputs_identical": identical,
        "records": records,
    }
    print(json.dumps({"figures": figures, "outputs_identical": identical, **records}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
