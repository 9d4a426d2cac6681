"""Decode steps over an fp32, a bf16, an fp16 and an int8 KV cache, four engines alternating in
one process.

The engines differ only in `kv_cache_dtype` (fp32 compute on the CPU, the default benchmark
model: hidden 1024, 8 layers, 16 kv heads of 64, NF4). Each gets `--rows` random prompts of
`--prompt-tokens` tokens (the default benchmark's 64-128, or longer contexts, where attention
takes more of a step), prefilled in one step; then their decode steps alternate, so that all see
the same machine at the same moments. Prints each engine's median decode step and prefill step
(timed in rounds of their own, the engines taking turns), their ratios to the fp32 cache's, and
the bytes the cache holds per token.

    .venv/bin/python benchmarks/bench_kv_dtype.py
    .venv/bin/python benchmarks/bench_kv_dtype.py --prompt-tokens 1024 1024 --new-tokens 32
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
import transformers

from bench_multi_lora import DEFAULT, make_workload
from common import Workload
from engine_runs import Trace, alternate_decode_steps, submit
from loraserve.engine.core import EngineCore
from profile_step import warm_base_engine

KV_DTYPES = ("compute", "bf16", "fp16", "int8")


def prefill_seconds(core: EngineCore, workload: Workload) -> float:
    """The time of the step that prefills every prompt of `workload` (then run to the end)."""
    submit(core, Trace(), workload, with_adapters=False)
    started = time.perf_counter()
    core.step()
    seconds = time.perf_counter() - started
    while core.has_work():
        core.step()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT.num_requests)
    parser.add_argument(
        "--prompt-tokens", type=int, nargs=2, default=DEFAULT.prompt_tokens, metavar=("LOW", "HIGH")
    )
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of prefill, then decode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    low, high = args.prompt_tokens
    bench = replace(
        DEFAULT,
        num_requests=args.rows,
        prompt_tokens=(low, high),
        max_step_tokens=max(DEFAULT.max_step_tokens, args.rows * high),  # one prefill step
    )
    workload = make_workload(bench, [""] * args.rows).head(args.rows, args.new_tokens)
    cores: dict[str, EngineCore] = {
        kv: warm_base_engine(workload, bench=bench, kv_cache_dtype=kv) for kv in KV_DTYPES
    }
    steps = alternate_decode_steps(cores, workload, args.repeats, with_adapters=False)
    decode = {kv: statistics.median(times) * 1e3 for kv, times in steps.items()}
    prefills: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
    for repeat in range(args.repeats):
        for kv in KV_DTYPES if repeat % 2 else KV_DTYPES[::-1]:
            prefills[kv].append(prefill_seconds(cores[kv], workload))
    prefill = {kv: statistics.median(times) * 1e3 for kv, times in prefills.items()}
    print(f"{args.rows} rows, prompts of {low}-{high} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, {len(steps['compute'])} decode steps and "
          f"{args.repeats} prefill steps each")  # fmt: skip
    for kv, core in cores.items():
        name = "fp32" if kv == "compute" else kv
        print(f"{name} cache: decode step median {decode[kv]:.2f} ms "
              f"({decode[kv] / decode['compute']:.3f} of fp32's), prefill step {prefill[kv]:.0f} "
              f"ms ({prefill[kv] / prefill['compute']:.3f}), "
              f"{core.cache.bytes_per_token() / 1024:.0f} KiB a token")  # fmt: skip


if __name__ == "__main__":
    main()
