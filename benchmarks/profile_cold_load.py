"""Adapter cold-load latency alone: the benchmark's `adapter_cold_load_ms`, without the rest.

Builds what `bench_multi_lora.py` builds for it (the default model, its 32 rank-16 adapters on
all seven projections, each already in a device slot), then times `cold_load_ms` (disk to a
ready slot, files in the page cache) `--loads` times and prints the median, p99 and minimum.
With `--dora` the adapter loaded is the benchmark's DoRA one (`adapter_cold_load_dora_ms`);
`--bf16-stored` loads the same adapter saved in bf16 (as adapters trained in bf16 are), and
the bytes the host tier holds for the adapter loaded are printed too;
`--max-rank` sizes the slots for a larger rank than the adapters' 16 (the server's default is
64), as a server that accepts higher ranks has them; `--compute-dtype bf16` loads into a bf16
engine's slots.
To compare two trees side by side, run it alternately with each tree's `server` first on
PYTHONPATH; to see where the time goes, run it under py-spy (the loads run on the thread
named `loraserve-loader`):

    .venv/bin/python benchmarks/profile_cold_load.py --loads 40
    .venv/bin/python benchmarks/profile_cold_load.py --loads 20 --dora
    .venv/bin/python benchmarks/profile_cold_load.py --loads 40 --bf16-stored
    .venv/bin/py-spy record --native --threads -r 1000 -o cold.svg -- \
        .venv/bin/python benchmarks/profile_cold_load.py --loads 400
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
import transformers

from adapter_cache import cold_load_ms, percentile
from bench_multi_lora import DEFAULT, TARGETS, TTFT_WAVES, base_engine_config, make_workload
from common import DEFAULT_CACHE_DIR, prepare_lora_adapters, prepare_model, stored_in
from engine_runs import build_engine, engine_config
from loraserve.adapters.peft_format import read_peft_adapter
from loraserve.model.loading import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="untimed loads first")
    parser.add_argument("--dora", action="store_true", help="load a DoRA adapter")
    parser.add_argument("--bf16-stored", action="store_true", help="the adapter saved in bf16")
    parser.add_argument("--max-rank", type=int, help="the slots' rank (default: the adapters')")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=DEFAULT.compute_dtype)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.disable_progress_bar()
    config = replace(DEFAULT, compute_dtype=args.compute_dtype)
    model_dir = prepare_model(config.model, DEFAULT_CACHE_DIR)
    adapter_dirs = prepare_lora_adapters(
        model_dir, config.num_requests, config.rank, config.alpha, TARGETS, config.seed
    )
    workload = make_workload(config, list(adapter_dirs))
    base = base_engine_config(config, model_dir)
    if args.max_rank is not None:
        base = base.model_copy(update={"max_rank": args.max_rank})
    high = config.prompt_tokens[1]
    core = build_engine(engine_config(base, workload, high, TTFT_WAVES * len(workload.prompts)),
                        adapter_dirs)  # fmt: skip
    adapter_dir = next(iter(adapter_dirs.values()))
    if args.dora:
        dora = prepare_lora_adapters(model_dir, 1, config.rank, config.alpha, TARGETS, dora=True)
        adapter_dir = next(iter(dora.values()))
    if args.bf16_stored:
        adapter_dir = stored_in({"cold": adapter_dir}, torch.bfloat16)["cold"]
    cold_load_ms(core, adapter_dir, args.warmup)
    times = cold_load_ms(core, adapter_dir, args.loads)
    kind = "DoRA cold load" if args.dora else "cold load"
    kind += " (stored in bf16)" if args.bf16_stored else ""
    print(
        f"{kind} ms over {args.loads}: p50 {statistics.median(times):.2f} "
        f"p99 {percentile(times, 0.99):.2f} min {min(times):.2f}"
    )
    manager = core.adapters
    held = read_peft_adapter(adapter_dir, manager.targets, config.rank, manager.dtype)
    print(f"host tier bytes for it: {held.nbytes}")


if __name__ == "__main__":
    main()
