"""Decode steps with the engine's long-lived tensors on 2 MiB pages and on 4 KiB pages, two
engines alternating in one process.

One engine is built as the server builds it (the KV pools, the LoRA slots and the large
unquantized weights on transparent huge pages, `loraserve/model/huge_pages.py`), the other with
`LORASERVE_HUGE_PAGES=off`; both run the default benchmark model (hidden 1024, 8 layers, NF4,
fp32 compute; `--hidden-size` and `--intermediate-size` change its widths) and its 32 prompts
(`--rows` of them), their decode steps alternating so that both see the same machine at the
same moments. Prints each engine's median decode step, the ratio, and how much of the process
the kernel backs with huge pages (`AnonHugePages`).

    .venv/bin/python benchmarks/bench_huge_pages.py
    .venv/bin/python benchmarks/bench_huge_pages.py --adapters
    .venv/bin/python benchmarks/bench_huge_pages.py --rows 1 --hidden-size 2048 \
        --intermediate-size 5632
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
from dataclasses import replace
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
import transformers

from bench_multi_lora import DEFAULT
from engine_runs import alternate_decode_steps
from loraserve.engine.core import EngineCore
from loraserve.model import huge_pages
from profile_step import base_workload, warm_base_engine, warm_lora_engine

PAGES = ("huge", "small")


def huge_pages_mib() -> float:
    """The process's anonymous memory on huge pages, MiB."""
    rollup = Path("/proc/self/smaps_rollup").read_text()
    found = re.search(r"AnonHugePages:\s+(\d+) kB", rollup)
    return int(found.group(1)) / 1024 if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT.num_requests)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of prefill, then decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--adapters", action="store_true", help="every row on its own adapter (32 adapters)"
    )
    parser.add_argument("--hidden-size", type=int, default=DEFAULT.model.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=DEFAULT.model.intermediate_size)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    if not huge_pages.available():
        parser.error("this kernel gives no huge pages (transparent_hugepage is 'never')")
    spec = replace(
        DEFAULT.model, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size
    )
    cores: dict[str, EngineCore] = {}
    for pages in PAGES:
        os.environ[huge_pages.SWITCH] = "on" if pages == "huge" else "off"
        if args.adapters:
            cores[pages], workload = warm_lora_engine(args.new_tokens, spec=spec)
        else:
            workload = base_workload(args.new_tokens)
            cores[pages] = warm_base_engine(workload, spec)
        workload = workload.head(args.rows, args.new_tokens)
        if pages == "huge":
            print(f"on huge pages after the first engine: {huge_pages_mib():.0f} MiB")
    steps = alternate_decode_steps(cores, workload, args.repeats, args.adapters)
    median = {pages: statistics.median(times) * 1e3 for pages, times in steps.items()}
    print(f"{len(workload.prompts)} rows, {'32 adapters' if args.adapters else 'no adapters'}, "
          f"hidden {spec.hidden_size}, intermediate {spec.intermediate_size}, {args.threads} "
          f"threads, {len(steps['huge'])} decode steps each")  # fmt: skip
    for pages in PAGES:
        print(f"{pages} pages: decode step median {median[pages]:.2f} ms")
    print(f"huge / small, median decode step: {median['huge'] / median['small']:.3f}")


if __name__ == "__main__":
    main()
