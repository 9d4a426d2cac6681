"""Where one engine step's time goes: the prefill step and a decode step of the benchmark's
default workload (or its first `--requests` prompts), timed, then broken down by op with the
torch profiler.

Builds the default benchmark model (hidden 1024, 8 layers, NF4, fp32 compute), submits 32
prompts of 64-128 tokens that all prefill in the first step, and steps the engine directly.
`--model` picks another random base (`bench_multi_lora.BASES`: one of TinyLlama 1.1B's shape),
`--checkpoint-dtype` how its checkpoint stores the weights (published ones: bf16).
With `--floor` the model keeps its depth and vocabulary but has hidden size 128 (2 heads of 64):
its steps cost what a step costs besides the model's arithmetic (Python, op dispatch, the
per-layer small ops, sampling over the whole vocabulary). With `--adapters` every row is on its
own adapter (the benchmark's 32, rank 16 on all seven projections): what a multi-LoRA step adds.
`--decode-records 0` runs every decode step eagerly (the engine's default replays records of
the forward: `traced_decode_records`).
With `--device cuda` the profiler also times the GPU's kernels: a decode step's wall time beside
the time its kernels kept the GPU busy is what launch overhead (and a CUDA graph) is worth.

    .venv/bin/python benchmarks/profile_step.py --threads 2 --new-tokens 16
    .venv/bin/python benchmarks/profile_step.py --threads 2 --new-tokens 64 --floor
    .venv/bin/python benchmarks/profile_step.py --threads 2 --new-tokens 32 --adapters
    .venv/bin/python benchmarks/profile_step.py --threads 2 --new-tokens 64 --requests 1
    .venv/bin/python benchmarks/profile_step.py --threads 2 --new-tokens 64 --requests 1 \
        --decode-records 0
    .venv/bin/python benchmarks/profile_step.py --model tinyllama-1.1b --checkpoint-dtype bf16 \
        --compute-dtype bf16 --requests 1 --new-tokens 64
    python3 benchmarks/profile_step.py --device cuda --compute-dtype bf16 --new-tokens 32
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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_multi_lora import (
    BASES,
    DEFAULT,
    TARGETS,
    BenchConfig,
    base_engine_config,
    make_workload,
)
from common import DEFAULT_CACHE_DIR, ModelSpec, Workload, prepare_lora_adapters, prepare_model
from engine_runs import Trace, build_engine, engine_config, submit
from loraserve.engine.core import EngineCore
from loraserve.model.loading import DTYPES


def timed_steps(core: EngineCore, trace: Trace) -> list[float]:
    times = []
    while core.has_work():
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    return times


def base_workload(
    new_tokens: int, requests: int = DEFAULT.num_requests, bench: BenchConfig = DEFAULT
) -> Workload:
    """The first `requests` of the benchmark's 32 prompts (drawn from `bench`'s model's
    vocabulary), on the base model, each generating `new_tokens`."""
    workload = make_workload(bench, [""] * bench.num_requests)
    return workload.head(requests, new_tokens)


def floor_of(spec: ModelSpec) -> ModelSpec:
    """`spec`'s depth and vocabulary at hidden size 128 (2 heads of 64): what its steps cost
    besides the arithmetic."""
    return replace(spec, hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=2)


def warm_base_engine(
    workload: Workload,
    spec: ModelSpec = DEFAULT.model,
    bench: BenchConfig = DEFAULT,
    **overrides: object,
) -> EngineCore:
    """The model of `spec` (NF4, `bench`'s compute dtype and device) in an engine sized for
    `workload` (with `overrides` of its settings), warmed up by a few short requests."""
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    settings = engine_config(base_engine_config(bench, model_dir), workload,
                             bench.prompt_tokens[1])  # fmt: skip
    core = build_engine(settings.model_copy(update=overrides), {})
    submit(core, Trace(), workload.head(4, 2), with_adapters=False)
    timed_steps(core, Trace())
    return core


def warm_lora_engine(
    new_tokens: int,
    bench: BenchConfig = DEFAULT,
    spec: ModelSpec = DEFAULT.model,
    **overrides: object,
) -> tuple[EngineCore, Workload]:
    """The model of `spec` with the benchmark's 32 adapters (rank 16, all seven projections),
    each in its own slot (an engine with `overrides` of its settings), and the 32 prompts each
    on its own adapter, generating `new_tokens`."""
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    adapter_dirs = prepare_lora_adapters(model_dir, DEFAULT.num_requests, DEFAULT.rank,
                                         DEFAULT.alpha, TARGETS, DEFAULT.seed)  # fmt: skip
    workload = make_workload(DEFAULT, list(adapter_dirs)).head(DEFAULT.num_requests, new_tokens)
    settings = engine_config(base_engine_config(bench, model_dir), workload,
                             bench.prompt_tokens[1])  # fmt: skip
    core = build_engine(settings.model_copy(update=overrides), adapter_dirs)
    submit(core, Trace(), workload.head(4, 2), with_adapters=True)
    timed_steps(core, Trace())
    return core, workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows")
    parser.add_argument(
        "--requests", type=int, default=DEFAULT.num_requests, help="rows of the batch (base only)"
    )
    parser.add_argument(
        "--model", choices=sorted(BASES), default="default", help="the random base's shape"
    )
    parser.add_argument(
        "--checkpoint-dtype",
        choices=("fp32", "bf16"),
        default=DEFAULT.model.weights_dtype,
        help="how the random model's checkpoint stores its weights (published ones: bf16)",
    )
    parser.add_argument("--floor", action="store_true", help="the model at hidden size 128")
    parser.add_argument(
        "--adapters", action="store_true", help="every row on its own adapter (32 adapters)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=DEFAULT.compute_dtype)
    parser.add_argument(
        "--decode-records", type=int, help="traced_decode_records (0: every decode step eager)"
    )
    args = parser.parse_args()
    spec = replace(BASES[args.model], weights_dtype=args.checkpoint_dtype)
    bench = replace(DEFAULT, model=spec, device=args.device, compute_dtype=args.compute_dtype)
    if args.floor and args.adapters:
        parser.error("--adapters runs the model's adapters; it does not go with --floor")
    if args.adapters and args.requests != DEFAULT.num_requests:
        parser.error("--adapters runs the benchmark's 32 rows; it does not go with --requests")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    records = args.decode_records
    overrides = {} if records is None else {"traced_decode_records": records}
    if args.adapters:
        core, workload = warm_lora_engine(args.new_tokens, bench, spec, **overrides)
    else:
        workload = base_workload(args.new_tokens, args.requests, bench)
        model = floor_of(spec) if args.floor else spec
        core = warm_base_engine(workload, model, bench, **overrides)
    submit(core, Trace(), workload, with_adapters=args.adapters)
    times = timed_steps(core, Trace())
    print(f"{args.model} model{' (floor)' if args.floor else ''}, {args.checkpoint_dtype} "
          f"checkpoint, {args.threads} thread(s), {len(workload.prompts)} rows, "
          f"{args.compute_dtype} on {core.device}")  # fmt: skip
    print(f"prefill step {times[0] * 1e3:.0f} ms ({sum(map(len, workload.prompts))} tokens)")
    print(f"decode step median {statistics.median(times[1:]) * 1e3:.1f} ms, "
          f"min {min(times[1:]) * 1e3:.1f} ms")  # fmt: skip

    on_gpu = core.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    submit(core, Trace(), workload, with_adapters=args.adapters)
    with profile(activities=activities) as prefill:
        core.step()
    with profile(activities=activities) as decode:
        decode_times = timed_steps(core, Trace())
    for name, prof in (("prefill step", prefill), (f"{args.new_tokens - 1} decode steps", decode)):
        print(f"\n{name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if on_gpu:
            print(prof.key_averages().table(sort_by="self_device_time_total",
                                            row_limit=args.rows))  # fmt: skip
    if on_gpu:
        kernels = [e for e in decode.key_averages() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
        wall_ms = sum(decode_times) * 1e3
        print(f"decode steps (profiled): {wall_ms / len(decode_times):.2f} ms each, the GPU's "
              f"kernels busy {busy_ms / len(decode_times):.2f} ms of it")  # fmt: skip


if __name__ == "__main__":
    main()
