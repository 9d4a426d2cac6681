"""What `quantize_output` (the output projection in 4 bits) buys a decode step and costs the
logits, side by side with the output projection held in the compute dtype.

Builds one random base (`--model`, stored as `--checkpoint-dtype`) twice, as two engines of
the same settings but `quantize_output`, and for each `--rows` count submits that many of the
benchmark's prompts to both and alternates their decode steps, so that both see the same
machine at the same moments (medians of every decode step of `--repeats` rounds). Then, on the
same base loaded both ways outside the engine, the logits of one teacher-forced forward over
each of the 32 prompts: how far the quantized projection moves them (relative L2 error per
position, median and largest) and how often the top token stays the same. On random weights
the logit figures describe NF4's rounding of a Gaussian-like matrix, not a trained model's
quality.

    .venv/bin/python benchmarks/bench_quantized_output.py \\
        --out benchmarks/results/quantized_output.json
    .venv/bin/python benchmarks/bench_quantized_output.py --model tinyllama-1.1b \\
        --checkpoint-dtype bf16 --compute-dtype bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

from loraserve.model.bitsandbytes_offline import bnb

import torch
import transformers

from bench_multi_lora import BASES, DEFAULT
from common import DEFAULT_CACHE_DIR, prepare_model
from engine_runs import alternate_decode_steps
from loraserve.engine.core import EngineCore
from loraserve.model.loading import load_base_model, quantized_bytes
from machine import machine_info
from profile_step import base_workload, warm_base_engine

HEADS = ("dense", "nf4")  # the output projection in the compute dtype / quantize_output


def head_bytes(core: EngineCore) -> int:
    """Bytes the engine's output projection holds (a 4-bit one: codes, scales and tables)."""
    head = core.runner.model.get_output_embeddings().module  # the BaseLinear's wrapped layer
    return quantized_bytes(head).quantized or head.weight.numel() * head.weight.element_size()


def logit_agreement(model_dir: Path, bench, prompts: list[tuple[int, ...]]) -> dict[str, float]:
    """The base loaded with the dense and with the quantized output projection: per position of
    each prompt (teacher-forced), the quantized logits' relative L2 error and whether the top
    token is the same."""
    logits = {}
    for head in HEADS:
        loaded = load_base_model(str(model_dir), bench.quantization, bench.compute_dtype, "cpu",
                                 quantize_output=head == "nf4")  # fmt: skip
        for module in loaded.model.modules():  # the compute dtype's arithmetic on every CPU
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            logits[head] = [
                loaded.model(torch.tensor([prompt])).logits[0].float() for prompt in prompts
            ]
    errors, same = [], []
    for dense, quantized in zip(logits["dense"], logits["nf4"], strict=True):
        errors += ((quantized - dense).norm(dim=-1) / dense.norm(dim=-1)).tolist()
        same += (quantized.argmax(-1) == dense.argmax(-1)).tolist()
    return {
        "positions": len(errors),
        "relative_error_median": round(statistics.median(errors), 5),
        "relative_error_max": round(max(errors), 5),
        "top1_same_share": round(sum(same) / len(same), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,32", help="decode rows, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of prefill, then decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(BASES), default="default")
    parser.add_argument("--checkpoint-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    spec = replace(BASES[args.model], weights_dtype=args.checkpoint_dtype)
    bench = replace(DEFAULT, model=spec, compute_dtype=args.compute_dtype)
    workload = base_workload(args.new_tokens, bench=bench)
    cores = {
        head: warm_base_engine(workload, spec, bench, quantize_output=head == "nf4")
        for head in HEADS
    }
    held = {head: head_bytes(core) for head, core in cores.items()}
    print(f"output projection: dense {held['dense'] / 2**20:.1f} MiB, "
          f"nf4 {held['nf4'] / 2**20:.1f} MiB")  # fmt: skip
    decode = {}
    for rows in map(int, args.rows.split(",")):
        steps = alternate_decode_steps(cores, workload.head(rows, args.new_tokens), args.repeats,
                                       with_adapters=False)  # fmt: skip
        median = {head: statistics.median(times) * 1e3 for head, times in steps.items()}
        decode[rows] = {
            **{f"{head}_ms": round(median[head], 3) for head in HEADS},
            "nf4_over_dense": round(median["nf4"] / median["dense"], 3),
            "steps": len(steps["nf4"]),
        }
        print(f"{rows} rows: {decode[rows]}", flush=True)
    del cores
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    logits = logit_agreement(model_dir, bench, list(workload.prompts))
    print(f"logits: {logits}")
    if args.out:
        report = {
            "machine": machine_info(),
            "command": vars(args) | {"out": str(args.out)},
            "output_projection_bytes": held,
            "decode_step": decode,
            "logits": logits,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
