"""Throughput against the number of distinct adapters, for this engine and both HF PEFT
baselines, written as JSON and as a PNG plot.

For each count n in `--counts` (default 1, 8, 32, 128, 1,000) the workload is max(32, n)
requests over n distinct registered adapters (request i on adapter i mod n), every request
generating the same number of tokens greedily:

  engine             one continuous batch of up to `BATCH` rows, `BATCH` device slots: adapters
                     beyond the slots are swapped in and out as requests finish
  peft_mixed_batch   PEFT `generate(adapter_names=...)` on chunks of `BATCH` requests
  peft_sequential    PEFT one request at a time, `set_adapter` before each

Adapter i's weights are the benchmark's adapter directory i mod 32 (each name is its own
adapter to every tier and to PEFT; the disk holds 32 files). Each point is the median of
`--repeats` runs after a warm-up run of the same workload (until 2026-12-06 a warm-up of 4
requests, after which the engine's first timed run recorded its 32-row decode steps: the
slowest run of each point, 0.67 of the next at one adapter).

PEFT is given at most `--peft-max-adapters` (128): its `load_adapter` walks every module of the
model, which grows with each adapter loaded, so 1,000 adapters take hours to load (474 took 27
minutes on the 2-core machine of RESULTS.md). The JSON records PEFT's load time and the counts
it was not run at.

    .venv/bin/python benchmarks/bench_adapter_sweep.py --out benchmarks/results/sweep.json \\
        --plot benchmarks/results/adapter_sweep.png
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import matplotlib
import torch
import transformers

from common import (
    DEFAULT_CACHE_DIR,
    ModelSpec,
    Workload,
    prepare_lora_adapters,
    prepare_model,
    timed,
)
from engine_runs import run_engine
from hf_baselines import load_peft, run_peft_mixed, run_peft_sequential
from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.model.loading import load_base_model
from loraserve.model.tiny import SPECIAL_TOKENS
from machine import machine_info

matplotlib.use("Agg")
from matplotlib import pyplot as plt

MODEL = ModelSpec(512, 1408, 4, 8, 8, 8000)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, DIRECTORIES = 16, 32.0, 32
BATCH, MIN_REQUESTS = 64, 32
PROMPTS, NEW_TOKENS = (32, 64), 16
COUNTS = (1, 8, 32, 128, 1000)
SERIES = ("engine", "peft_mixed_batch", "peft_sequential")


def workload(count: int, seed: int = 0) -> Workload:
    requests = max(MIN_REQUESTS, count)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPTS[0], PROMPTS[1] + 1, (requests,), generator=gen).tolist()
    first = len(SPECIAL_TOKENS)
    prompts = tuple(
        tuple(torch.randint(first, MODEL.vocab_size, (n,), generator=gen).tolist()) for n in lengths
    )
    return Workload(prompts, tuple(f"a{i % count}" for i in range(requests)), NEW_TOKENS)


def engine(model_dir: Path, names: dict[str, Path]) -> EngineCore:
    per_request = PROMPTS[1] + NEW_TOKENS
    config = EngineConfig(
        model=str(model_dir), max_rank=RANK, device_slots=BATCH, max_batch_size=BATCH,
        kv_cache_tokens=BATCH * per_request, max_context=per_request, max_step_tokens=4096,
        prefix_caching=False,  # the same prompts repeat: compute them every time
    )  # fmt: skip
    loaded = load_base_model(config.model, config.quantization, config.compute_dtype, "cpu")
    core = EngineCore(loaded, config)
    for name, directory in names.items():
        core.adapters.load(name, directory)
    return core


def peft_chunks(model, loaded, w: Workload) -> int:
    total = 0
    for start in range(0, len(w.prompts), BATCH):
        chunk = Workload(w.prompts[start : start + BATCH], w.adapters[start : start + BATCH],
                         w.new_tokens)  # fmt: skip
        total += run_peft_mixed(model, loaded, chunk)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-max-adapters", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--plot", type=Path, required=True, help="PNG plot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    model_dir = prepare_model(MODEL, args.cache_dir)
    dirs = list(prepare_lora_adapters(model_dir, DIRECTORIES, RANK, ALPHA, TARGETS).values())
    names = {f"a{i}": dirs[i % len(dirs)] for i in range(max(args.counts))}
    core = engine(model_dir, names)
    peft_count = max((n for n in args.counts if n <= args.peft_max_adapters), default=0)
    start = time.perf_counter()
    peft, peft_loaded = load_peft(
        model_dir, dict(list(names.items())[:peft_count]), "nf4", "fp32", "cpu"
    )
    peft_load_seconds = time.perf_counter() - start
    runs = {
        "engine": lambda w: run_engine(core, w, with_adapters=True).tokens,
        "peft_mixed_batch": partial(peft_chunks, peft, peft_loaded),
        "peft_sequential": partial(run_peft_sequential, peft, peft_loaded),
    }
    results: dict[str, dict[int, list[float]]] = {s: {} for s in SERIES}
    for count in args.counts:
        w = workload(count)
        for series, fn in runs.items():
            if series.startswith("peft") and count > peft_count:
                continue
            fn(w)  # warm-up: the engine records its decode steps for this batch's row counts
            tok_s = [timed(partial(fn, w), core.device).tok_s for _ in range(args.repeats)]
            results[series][count] = tok_s
            print(f"{count:>5} adapters {series:<18} {statistics.median(tok_s):9.1f} tok/s",
                  flush=True)  # fmt: skip

    medians = {s: {n: statistics.median(v) for n, v in r.items()} for s, r in results.items()}
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for series in SERIES:
        counts = sorted(medians[series])
        axis.plot(counts, [medians[series][n] for n in counts], marker="o", label=series)
    axis.set_xscale("log")
    axis.set_xlabel("distinct adapters in the workload")
    axis.set_ylabel("generated tokens / s")
    axis.set_title(f"NF4 base (hidden {MODEL.hidden_size}), rank {RANK}, batch {BATCH}, CPU")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    args.out.write_text(json.dumps({
        "medians_tok_s": medians, "runs_tok_s": results,
        "peft_adapters_loaded": peft_count, "peft_load_seconds": peft_load_seconds,
        "peft_not_run_at": [n for n in args.counts if n > peft_count],
        "config": {"model": MODEL.__dict__, "rank": RANK, "batch": BATCH,
                   "prompt_tokens": PROMPTS, "new_tokens": NEW_TOKENS},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
