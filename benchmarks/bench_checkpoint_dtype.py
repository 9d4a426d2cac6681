"""Decode steps of one model stored in fp32 and in bf16, two engines alternating in one process.

Both engines compute in fp32 on the CPU; the bf16-stored model's unquantized weights (the
output projection and the input embedding; with `--quantization none`, every projection) are
held in bf16 and widened as they are read (`loraserve/model/narrow.py`), the fp32-stored one's
stay fp32. Builds the default benchmark model both ways (hidden 1024, 8 layers, vocabulary
32,000), submits `--rows` of the benchmark's prompts to each engine and alternates their decode
steps, so that both see the same machine at the same moments; prints each engine's median
decode step, the ratio, and the bytes the two engines' unquantized weights hold.

    .venv/bin/python benchmarks/bench_checkpoint_dtype.py --rows 1
    .venv/bin/python benchmarks/bench_checkpoint_dtype.py --rows 32 --quantization none
    .venv/bin/python benchmarks/bench_checkpoint_dtype.py --rows 1 --vocab-size 128256
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

from loraserve.model.bitsandbytes_offline import bnb

import torch
import transformers
from torch import nn

from bench_multi_lora import DEFAULT
from engine_runs import alternate_decode_steps
from loraserve.engine.core import EngineCore
from profile_step import base_workload, warm_base_engine

DTYPES = ("fp32", "bf16")


def unquantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters that bitsandbytes did not quantize, each tensor once."""
    unique = {id(p): p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)}
    return sum(p.numel() * p.element_size() for p in unique.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT.num_requests)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of prefill, then decode")
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT.model.vocab_size, help="e.g. Llama 3's 128256"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    workload = base_workload(args.new_tokens).head(args.rows, args.new_tokens)
    bench = replace(DEFAULT, quantization=args.quantization)
    spec = replace(DEFAULT.model, vocab_size=args.vocab_size)
    cores: dict[str, EngineCore] = {
        dtype: warm_base_engine(workload, replace(spec, weights_dtype=dtype), bench)
        for dtype in DTYPES
    }
    steps = alternate_decode_steps(cores, workload, args.repeats, with_adapters=False)
    median = {dtype: statistics.median(times) * 1e3 for dtype, times in steps.items()}
    print(f"{args.rows} rows, {args.quantization}, vocabulary {args.vocab_size}, "
          f"{args.threads} threads, {len(steps['fp32'])} decode steps each")  # fmt: skip
    for dtype, core in cores.items():
        held = unquantized_weight_bytes(core.runner.model) / 2**20
        print(f"stored {dtype}: decode step median {median[dtype]:.2f} ms, unquantized weights "
              f"{held:.1f} MiB")  # fmt: skip
    print(f"bf16 / fp32, median decode step: {median['bf16'] / median['fp32']:.3f}")


if __name__ == "__main__":
    main()
