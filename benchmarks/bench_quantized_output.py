"""What `quantize_output` (the output projection in 4 bits, or in 8) buys a decode step and
costs the logits, side by side with the output projection held in the compute dtype.

Builds one random base (`--model`, stored as `--checkpoint-dtype`) three times, as engines of
the same settings but `quantize_output` (off, 4bit, int8), and for each `--rows` count submits
that many of the benchmark's prompts to each and alternates their decode steps, so that all see
the same machine at the same moments (medians of every decode step of `--repeats` rounds). Then,
on the same base loaded each way outside the engine, the logits of one teacher-forced forward
over each of the 32 prompts: how far each quantized projection moves them (relative L2 error
per position, median and largest) and how often the top token stays the same. On random
weights the logit figures describe each format's rounding of a Gaussian-like matrix, not a
trained model's quality: `--demo` measures instead the built-in demo's trained base (its
vocabulary of 161 is not one bitsandbytes quantizes in 4 bits on the CPU, so int8 only).

    .venv/bin/python benchmarks/bench_quantized_output.py \\
        --out benchmarks/results/quantized_output.json
    .venv/bin/python benchmarks/bench_quantized_output.py --model tinyllama-1.1b \\
        --checkpoint-dtype bf16 --compute-dtype bf16
    .venv/bin/python benchmarks/bench_quantized_output.py --demo
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
from dataclasses import replace
from pathlib import Path

from loraserve.model.bitsandbytes_offline import bnb

import torch
import transformers

from bench_multi_lora import BASES, DEFAULT
from common import DEFAULT_CACHE_DIR, prepare_model
from engine_runs import alternate_decode_steps
from loraserve.demo import demo_model
from loraserve.demo.training import IGNORED, exact_share, make_batch
from loraserve.engine.core import EngineCore
from loraserve.model.loading import load_base_model, quantized_bytes
from machine import machine_info
from profile_step import base_workload, warm_base_engine

# the output projection in the compute dtype, then each quantize_output format
QUANTIZE_OUTPUT = {"dense": "off", "nf4": "4bit", "int8": "int8"}
HEADS = tuple(QUANTIZE_OUTPUT)
QUANTIZED = HEADS[1:]


def head_bytes(core: EngineCore) -> int:
    """Bytes the engine's output projection holds (a 4-bit one: codes, scales and tables; an
    8-bit one: codes and scales)."""
    head = core.runner.model.get_output_embeddings().module  # the BaseLinear's wrapped layer
    return quantized_bytes(head).quantized or sum(p.nbytes for p in head.parameters())


def logit_agreement(
    model_dir: Path, bench, prompts: list[tuple[int, ...]]
) -> dict[str, dict[str, float]]:
    """The base loaded with the dense and with each quantized output projection: per position
    of each prompt (teacher-forced), each quantized head's relative L2 error of the logits and
    whether the top token is the same."""
    logits = {}
    for head in HEADS:
        loaded = load_base_model(str(model_dir), bench.quantization, bench.compute_dtype, "cpu",
                                 quantize_output=QUANTIZE_OUTPUT[head])  # fmt: skip
        for module in loaded.model.modules():  # the compute dtype's arithmetic on every CPU
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            logits[head] = [
                loaded.model(torch.tensor([prompt])).logits[0].float() for prompt in prompts
            ]
    agreement = {}
    for head in QUANTIZED:
        errors, same = [], []
        for dense, quantized in zip(logits["dense"], logits[head], strict=True):
            errors += ((quantized - dense).norm(dim=-1) / dense.norm(dim=-1)).tolist()
            same += (quantized.argmax(-1) == dense.argmax(-1)).tolist()
        agreement[head] = {
            "positions": len(errors),
            "relative_error_median": round(statistics.median(errors), 5),
            "relative_error_max": round(max(errors), 5),
            "top1_same_share": round(sum(same) / len(same), 4),
        }
    return agreement


def demo_agreement(prompts: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """On the built-in demo's trained base (NF4, as `loraserve serve` serves it), `prompts` of its
    held-out prompts with their right answers, teacher-forced, with the output projection dense
    and in int8: at each answer position the logits' relative error and whether the top token is
    the same; and each head's share of prompts whose every answer token is its top one
    (`exact_share`, the check the demo's training makes)."""
    base = demo_model().base
    batch = make_batch(random.Random(seed), "base", prompts, held_out=True)
    answer = batch.labels[:, 1:] != IGNORED  # the positions whose next token is the answer's
    logits, exact = {}, {}
    for head in ("dense", "int8"):
        loaded = load_base_model(str(base), "nf4", "fp32", "cpu",
                                 quantize_output=QUANTIZE_OUTPUT[head])  # fmt: skip
        for module in loaded.model.modules():  # fp32 arithmetic on every CPU
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            out = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits[head] = out.logits[:, :-1].float()[answer]  # [answer positions, vocabulary]
        exact[head] = round(exact_share(loaded.model, "base", prompts, seed), 4)
    dense, quantized = logits["dense"], logits["int8"]
    errors = ((quantized - dense).norm(dim=-1) / dense.norm(dim=-1)).tolist()
    return {
        "int8": {
            "positions": len(errors),
            "relative_error_median": round(statistics.median(errors), 5),
            "relative_error_max": round(max(errors), 5),
            "top1_same_share": round(
                (quantized.argmax(-1) == dense.argmax(-1)).float().mean().item(), 4
            ),
            "exact_share": exact["int8"],
        },
        "dense": {"exact_share": exact["dense"]},
    }


def write_report(args: argparse.Namespace, **results: object) -> None:
    """With `--out`, the machine, the command and `results` as JSON there."""
    if args.out:
        report = {"machine": machine_info(), "command": vars(args) | {"out": str(args.out)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report | results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,32", help="decode rows, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of prefill, then decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(BASES), default="default")
    parser.add_argument("--checkpoint-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--demo", type=int, nargs="?", const=512, metavar="PROMPTS",
        help="only the logits, on this many held-out prompts of the demo's trained base",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    if args.demo:
        agreement = demo_agreement(args.demo)
        print(f"demo logits: {agreement}")
        write_report(args, demo_logits=agreement)
        return
    spec = replace(BASES[args.model], weights_dtype=args.checkpoint_dtype)
    bench = replace(DEFAULT, model=spec, compute_dtype=args.compute_dtype)
    workload = base_workload(args.new_tokens, bench=bench)
    cores = {
        head: warm_base_engine(workload, spec, bench, quantize_output=QUANTIZE_OUTPUT[head])
        for head in HEADS
    }
    held = {head: head_bytes(core) for head, core in cores.items()}
    print("output projection: " + ", ".join(f"{h} {n / 2**20:.1f} MiB" for h, n in held.items()))
    decode = {}
    for rows in map(int, args.rows.split(",")):
        steps = alternate_decode_steps(cores, workload.head(rows, args.new_tokens), args.repeats,
                                       with_adapters=False)  # fmt: skip
        median = {head: statistics.median(times) * 1e3 for head, times in steps.items()}
        decode[rows] = {
            **{f"{head}_ms": round(median[head], 3) for head in HEADS},
            **{f"{h}_over_dense": round(median[h] / median["dense"], 3) for h in QUANTIZED},
            "steps": len(steps["dense"]),
        }
        print(f"{rows} rows: {decode[rows]}", flush=True)
    del cores
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    logits = logit_agreement(model_dir, bench, list(workload.prompts))
    print(f"logits: {logits}")
    write_report(args, output_projection_bytes=held, decode_step=decode, logits=logits)


if __name__ == "__main__":
    main()
