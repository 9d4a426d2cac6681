"""Where bf16 rows take the bf16 kernels: each path a bf16 projection can take, side by side.

For bf16 compute on a CPU with bf16 kernels (AMX tiles, `amx_tiles()`, or else AVX512-BF16's
pair dot products, `bf16_pairs()`), times, at each row count, the three paths `BaseLinear`
chooses between for a 4-bit weight: the bf16 kernel (`linear_4bit_bf16`), the fp32 4-bit kernel
on widened rows, and bitsandbytes' dequantize to bf16 followed by torch's bf16 GEMM; and the two
paths for a bf16 weight (the output projection): the bf16 kernel (`linear_bf16`) and torch's bf16
GEMM. One round is every 4-bit projection
of a decode step of the default benchmark model (8 layers x 7, each layer its own random NF4
weights), or its output projection; the paths alternate round by round, with 64 MB read
before each round so that the weights come from memory as in a model. Prints each path's
median round in ms; these medians set `AMX_TILE_MIN_ROWS` and `AMX_DENSE_MAX_ROWS` (with tiles)
or `PAIRS_MIN_ROWS` (without).

    .venv/bin/python benchmarks/bench_bf16_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from loraserve.model.bitsandbytes_offline import bnb

import torch
import torch.nn.functional as F

from bench_multi_lora import DEFAULT
from loraserve.model.host_memory import keep_freed_memory
from loraserve.model.kernels import native
from loraserve.model.linear import Packed4bit, amx_tiles, bf16_pairs, matmul_group

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256)


def decode_weights(generator: torch.Generator) -> list[Packed4bit]:
    """The default model's 56 projections as random NF4 weights (blocks of 64, plain scales)."""
    hidden, inner = DEFAULT.model.hidden_size, DEFAULT.model.intermediate_size
    shapes = [(hidden, hidden)] * 4 + [(inner, hidden)] * 2 + [(hidden, inner)]  # (N, K)
    nf4 = bnb.functional.get_4bit_type("nf4", device="cpu")
    return [
        Packed4bit(
            torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=generator),
            torch.rand(n * k // 64, generator=generator) * 0.1,
            nf4,
            64,
            n,
            k,
            None,
        )
        for _ in range(DEFAULT.model.num_layers)
        for n, k in shapes
    ]


def alternate(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each path once a round, the order reversed every round, 64 MB read before each; the
    median round of each in ms (the first two are warm-up)."""
    flush = torch.randn(16 << 20)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for turn in range(rounds):
        for name in list(paths) if turn % 2 else list(paths)[::-1]:
            flush.sum()
            started = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds[2:]) * 1e3 for name, seconds in times.items()}


def projection_paths(
    ops: Any, weights: list[Packed4bit], xs: dict[int, torch.Tensor]
) -> dict[str, Callable[[], object]]:
    """The three paths of a 4-bit weight for bf16 rows, each over all `weights` (x by K)."""

    def bf16_kernel() -> None:
        for w in weights:
            matmul_group(ops, xs[w.in_features], [w], [None])

    def widened() -> None:
        for w in weights:
            w.matmul(ops, xs[w.in_features].float(), None).to(torch.bfloat16)

    def dequantized() -> None:
        for w in weights:
            F.linear(xs[w.in_features], w.dequantize().to(torch.bfloat16))

    return {"kernel": bf16_kernel, "widened": widened, "dequantized": dequantized}


def output_paths(ops: Any, head: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The two paths of a bf16 weight for bf16 rows."""
    return {"kernel": lambda: ops.linear_bf16(x, head, None), "torch": lambda: F.linear(x, head)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS, help="row counts to time")
    args = parser.parse_args()
    ops = native()
    if ops is None or not (amx_tiles() or bf16_pairs()):
        raise SystemExit("this CPU (or its kernel, or the kernels' build) runs no bf16 kernel")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    generator = torch.Generator().manual_seed(0)
    weights = decode_weights(generator)
    hidden, vocab = DEFAULT.model.hidden_size, DEFAULT.model.vocab_size
    head = (torch.randn(vocab, hidden, generator=generator) * 0.02).to(torch.bfloat16)
    kernel = "AMX tiles" if amx_tiles() else "pair dot products"
    print(f"{args.threads} thread(s), {args.rounds} rounds, medians in ms; bf16 kernel: {kernel}")
    print("rows | 56 NF4 projections: bf16 kernel, widened fp32 kernel, dequantize + bf16 GEMM"
          " | output projection: bf16 kernel, torch bf16")  # fmt: skip
    for rows in args.rows:
        xs = {
            k: torch.randn(rows, k, generator=generator).to(torch.bfloat16)
            for k in {w.in_features for w in weights}
        }

        projections = alternate(projection_paths(ops, weights, xs), args.rounds)
        output = alternate(output_paths(ops, head, xs[hidden]), args.rounds)
        print(
            f"{rows:4d} | {projections['kernel']:7.2f} {projections['widened']:7.2f} "
            f"{projections['dequantized']:7.2f} | {output['kernel']:6.2f} {output['torch']:6.2f}"
        )


if __name__ == "__main__":
    main()
