"""Multi-LoRA throughput: this engine against HF PEFT, side by side on one quantized base.

Measures generated tokens per second (prefill included in the wall time) for four
configurations that share one random-weight Llama-shaped base, one set of rank-16 adapters on
all seven projections, one set of prompts and one output length:

  engine_base         this engine, every request on the base model (no adapter)
  engine_multi_lora   this engine, every request on a different adapter, one continuous batch
  peft_mixed_batch    HF PEFT `generate(adapter_names=...)`: all requests in one left-padded batch
  peft_sequential     HF PEFT, one request at a time, `set_adapter` before each
  engine_zipf         this engine, 4x the requests over 1,000 registered adapters drawn
                      Zipf(alpha=1), 32 device slots, a host tier smaller than the adapters

and the cold-load latency of an adapter from disk to a ready device slot (p50, p99).

Every request generates exactly the configured number of tokens (greedy; `ignore_eos` for the
engine, `min_new_tokens == max_new_tokens` for HF). Model and adapter loading happen before any
timing; the engine gets all requests at once. Each configuration is warmed up once on a small
slice of the workload, then the four run round-robin `--repeats` times (base, multi, mixed,
sequential, base, ...) and the medians are reported, because the machines this runs on are
noisy. The random model and adapters are written once into a cache directory and reused.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_multi_lora.py --quick   # small; < 3 min on 2 CPUs
    .venv/bin/python benchmarks/bench_multi_lora.py --out results.json --repeats 3

The default configuration (hidden 1024, 8 layers, 32 requests, 64 new tokens) took about 15
minutes for three repeats on 2 CPUs, a third of it in peft_sequential.

`--out` writes the medians, the individual runs, the ratios, the configuration, the machine and
the command line as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import transformers
from peft import PeftModel

from adapter_cache import (
    ZIPF_ADAPTERS,
    ZIPF_HOST_FRACTION,
    ZIPF_SLOTS,
    build_zipf_engine,
    cold_load_ms,
    summarize_cold_loads,
    zipf_choices,
)
from common import (
    DEFAULT_CACHE_DIR,
    ModelSpec,
    Run,
    machine_info,
    prepare_lora_adapters,
    prepare_model,
    timed,
)
from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.engine.sequence import EmitFn, Event
from loraserve.model.loading import DTYPES, QUANTIZATIONS, LoadedModel, load_base_model
from loraserve.model.tiny import SPECIAL_TOKENS
from loraserve.types import GenerateRequest, SamplingParams, TokenEvent

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KV_BLOCK_SIZE = 16
WARMUP_REQUESTS, WARMUP_NEW_TOKENS = 4, 2
CONFIGURATIONS = (
    "engine_base",
    "engine_multi_lora",
    "peft_mixed_batch",
    "peft_sequential",
    "engine_zipf",
)
ZIPF_REQUEST_FACTOR = 4  # the Zipf workload has 4x the requests, batched to the same size


@dataclass(frozen=True)
class BenchConfig:
    model: ModelSpec
    num_requests: int  # also the number of adapters: one per request
    prompt_tokens: tuple[int, int]  # inclusive range of prompt lengths
    new_tokens: int
    rank: int
    alpha: float
    quantization: str
    compute_dtype: str
    device: str
    max_step_tokens: int
    repeats: int
    seed: int = 0


DEFAULT = BenchConfig(
    model=ModelSpec(1024, 2816, 8, 16, 16, 32000),
    num_requests=32,
    prompt_tokens=(64, 128),
    new_tokens=64,
    rank=16,
    alpha=32.0,
    quantization="nf4",
    compute_dtype="fp32",
    device="auto",
    max_step_tokens=4096,
    repeats=3,
)
QUICK = replace(
    DEFAULT,
    model=ModelSpec(512, 1408, 4, 8, 8, 8000),
    num_requests=8,
    prompt_tokens=(32, 64),
    new_tokens=16,
    repeats=5,
)


@dataclass(frozen=True)
class Workload:
    """prompts[i] runs on adapters[i] (when the configuration uses adapters)."""

    prompts: tuple[tuple[int, ...], ...]
    adapters: tuple[str, ...]
    new_tokens: int

    def head(self, n: int, new_tokens: int) -> Workload:
        return Workload(self.prompts[:n], self.adapters[:n], new_tokens)


RunFn = Callable[[Workload], int]  # runs a workload, returns the number of generated tokens


# ---- the workload --------------------------------------------------------------------------


def make_workload(config: BenchConfig, adapter_names: list[str]) -> Workload:
    """Random prompt token ids (no special tokens) of seeded random lengths."""
    gen = torch.Generator().manual_seed(config.seed)
    low, high = config.prompt_tokens
    lengths = torch.randint(low, high + 1, (config.num_requests,), generator=gen).tolist()
    first_id = len(SPECIAL_TOKENS)
    prompts = tuple(
        tuple(torch.randint(first_id, config.model.vocab_size, (n,), generator=gen).tolist())
        for n in lengths
    )
    return Workload(prompts, tuple(adapter_names), config.new_tokens)


# ---- this engine ---------------------------------------------------------------------------


def engine_config(config: BenchConfig, model_dir: Path, workload: Workload) -> EngineConfig:
    """Sized to run the whole workload in one continuous batch, one slot per adapter."""
    kv_tokens = sum(
        math.ceil((len(p) + workload.new_tokens) / KV_BLOCK_SIZE) * KV_BLOCK_SIZE
        for p in workload.prompts
    )
    return EngineConfig(
        model=str(model_dir),
        quantization=config.quantization,
        compute_dtype=config.compute_dtype,
        device=config.device,
        max_rank=config.rank,
        device_slots=len(workload.prompts),
        kv_cache_tokens=kv_tokens,
        kv_block_size=KV_BLOCK_SIZE,
        max_context=config.prompt_tokens[1] + workload.new_tokens,
        max_batch_size=config.num_requests,
        max_step_tokens=config.max_step_tokens,
    )


def build_engine(settings: EngineConfig, adapter_dirs: dict[str, Path]) -> EngineCore:
    """The engine with every adapter registered and already in its device slot."""
    loaded = load_base_model(
        settings.model, settings.quantization, settings.compute_dtype, settings.device
    )
    core = EngineCore(loaded, settings)
    for name, directory in adapter_dirs.items():
        core.adapters.prefetch(core.adapters.load(name, directory))
    assert core.adapters.wait_for_loads(timeout=600)
    return core


def run_engine(core: EngineCore, workload: Workload, with_adapters: bool) -> int:
    """Submit every request at once, step until idle; returns the tokens generated."""
    counts = [0] * len(workload.prompts)
    errors: list[Exception] = []

    def sink(i: int) -> EmitFn:
        def emit(event: Event) -> None:
            if isinstance(event, TokenEvent):
                counts[i] += 1
            elif isinstance(event, Exception):
                errors.append(event)

        return emit

    sampling = SamplingParams(max_new_tokens=workload.new_tokens, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(workload.prompts, workload.adapters)):
        request = GenerateRequest(
            prompt_token_ids=prompt, adapter=adapter if with_adapters else None, sampling=sampling
        )
        core.add_request(request, sink(i))
    while core.has_work():
        core.step()
    if errors:
        raise errors[0]
    check_generated("engine", counts, workload.new_tokens)
    return sum(counts)


# ---- HF PEFT -------------------------------------------------------------------------------


def load_peft(
    config: BenchConfig, model_dir: Path, adapter_dirs: dict[str, Path]
) -> tuple[PeftModel, LoadedModel]:
    """A fresh quantized base with every adapter loaded, LoRA weights in the compute dtype."""
    loaded = load_base_model(
        str(model_dir), config.quantization, config.compute_dtype, config.device
    )
    (first_name, first_dir), *rest = adapter_dirs.items()
    model = PeftModel.from_pretrained(loaded.model, first_dir, adapter_name=first_name)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(loaded.compute_dtype)
    model.eval()
    return model, loaded


def generate_kwargs(new_tokens: int, pad_token_id: int) -> dict:
    return {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": pad_token_id,
    }


def run_peft_mixed(model: PeftModel, loaded: LoadedModel, workload: Workload) -> int:
    """All requests in one left-padded batch, each row on its own adapter."""
    pad = loaded.tokenizer.pad_token_id
    width = max(len(p) for p in workload.prompts)
    input_ids = torch.full((len(workload.prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(workload.prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids.to(loaded.device),
        attention_mask=attention_mask.to(loaded.device),
        adapter_names=list(workload.adapters),
        **generate_kwargs(workload.new_tokens, pad),
    )
    generated = [out.shape[1] - width] * len(workload.prompts)
    check_generated("peft_mixed_batch", generated, workload.new_tokens)
    return sum(generated)


def run_peft_sequential(model: PeftModel, loaded: LoadedModel, workload: Workload) -> int:
    """One request at a time, switching the active adapter before each."""
    pad = loaded.tokenizer.pad_token_id
    generated = []
    for prompt, adapter in zip(workload.prompts, workload.adapters):
        model.set_adapter(adapter)
        input_ids = torch.tensor([prompt], device=loaded.device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **generate_kwargs(workload.new_tokens, pad),
        )
        generated.append(out.shape[1] - len(prompt))
    check_generated("peft_sequential", generated, workload.new_tokens)
    return sum(generated)


# ---- measuring -----------------------------------------------------------------------------


def check_generated(who: str, counts: list[int], expected: int) -> None:
    wrong = [c for c in counts if c != expected]
    if wrong:
        raise RuntimeError(
            f"{who}: {len(wrong)} request(s) generated {wrong[:4]} tokens, not {expected}"
        )


def setup(
    config: BenchConfig, cache_root: Path
) -> tuple[dict[str, tuple[RunFn, Workload]], torch.device, dict[str, float], Callable]:
    """Build every artifact and load every model. Returns each configuration's run function and
    workload (in CONFIGURATIONS order), the device, the seconds each setup took, and the
    cold-load measurement."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model_dir = prepare_model(config.model, cache_root)
    adapter_dirs = prepare_lora_adapters(
        model_dir, config.num_requests, config.rank, config.alpha, TARGETS, config.seed
    )
    workload = make_workload(config, list(adapter_dirs))
    seconds["artifacts"] = time.perf_counter() - start

    start = time.perf_counter()
    settings = engine_config(config, model_dir, workload)
    core = build_engine(settings, adapter_dirs)
    seconds["engine"] = time.perf_counter() - start
    start = time.perf_counter()
    zipf_core = build_zipf_engine(settings, list(adapter_dirs.values()))
    count = ZIPF_REQUEST_FACTOR * len(workload.prompts)
    names = [f"zipf-{i}" for i in range(ZIPF_ADAPTERS)]
    zipf = Workload(
        tuple(workload.prompts[i % len(workload.prompts)] for i in range(count)),
        tuple(zipf_choices(count, names, config.seed)),
        workload.new_tokens,
    )
    seconds["engine_zipf"] = time.perf_counter() - start
    start = time.perf_counter()
    mixed, mixed_loaded = load_peft(config, model_dir, adapter_dirs)
    seconds["peft_mixed_batch"] = time.perf_counter() - start
    start = time.perf_counter()
    sequential, sequential_loaded = load_peft(config, model_dir, adapter_dirs)
    seconds["peft_sequential"] = time.perf_counter() - start

    runs: dict[str, tuple[RunFn, Workload]] = {
        "engine_base": (partial(run_engine, core, with_adapters=False), workload),
        "engine_multi_lora": (partial(run_engine, core, with_adapters=True), workload),
        "peft_mixed_batch": (partial(run_peft_mixed, mixed, mixed_loaded), workload),
        "peft_sequential": (partial(run_peft_sequential, sequential, sequential_loaded), workload),
        "engine_zipf": (partial(run_engine, zipf_core, with_adapters=True), zipf),
    }
    cold_load = partial(cold_load_ms, core, next(iter(adapter_dirs.values())))
    return runs, core.device, seconds, cold_load


def measure(
    runs: dict[str, tuple[RunFn, Workload]], device: torch.device, repeats: int
) -> dict[str, list[Run]]:
    """Warm each configuration up once, then time them round-robin `repeats` times."""
    for name, (fn, workload) in runs.items():
        run = timed(partial(fn, workload.head(WARMUP_REQUESTS, WARMUP_NEW_TOKENS)), device)
        print(f"warm-up {name:<18} {run.seconds:7.1f} s", flush=True)
    results: dict[str, list[Run]] = {name: [] for name in runs}
    for repeat in range(1, repeats + 1):
        for name, (fn, workload) in runs.items():
            run = timed(partial(fn, workload), device)
            results[name].append(run)
            print(
                f"repeat {repeat}/{repeats} {name:<18} {run.seconds:7.1f} s {run.tok_s:9.1f} tok/s",
                flush=True,
            )
    return results


# ---- reporting -----------------------------------------------------------------------------


def report(
    config: BenchConfig,
    results: dict[str, list[Run]],
    setup_seconds: dict[str, float],
    device: torch.device,
    cold_loads_ms: list[float],
) -> dict:
    medians = {name: statistics.median(r.tok_s for r in runs) for name, runs in results.items()}
    multi = medians["engine_multi_lora"]
    return {
        **{f"{name}_tok_s": value for name, value in medians.items()},
        **summarize_cold_loads(cold_loads_ms),
        "zipf_over_base": medians["engine_zipf"] / medians["engine_base"],
        "multi_lora_over_base": multi / medians["engine_base"],
        "multi_lora_over_peft_mixed": multi / medians["peft_mixed_batch"],
        "multi_lora_over_peft_sequential": multi / medians["peft_sequential"],
        "runs": {
            name: [{**asdict(r), "tok_s": r.tok_s} for r in runs] for name, runs in results.items()
        },
        "cold_loads_ms": cold_loads_ms,
        "setup_seconds": setup_seconds,
        "config": {
            **asdict(config),
            "resolved_device": str(device),
            "zipf": {
                "adapters": ZIPF_ADAPTERS,
                "device_slots": ZIPF_SLOTS,
                "host_budget_fraction": ZIPF_HOST_FRACTION,
                "requests": ZIPF_REQUEST_FACTOR * config.num_requests,
                "alpha": 1.0,
            },
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def print_summary(summary: dict) -> None:
    print()
    print(
        f"{'configuration':<20} {'median tok/s':>12} {'median s':>9} {'median cpu s':>12}"
        "  runs (tok/s)"
    )
    for name in CONFIGURATIONS:
        runs = summary["runs"][name]
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu_seconds = statistics.median(r["cpu_seconds"] for r in runs)
        each = ", ".join(f"{r['tok_s']:.1f}" for r in runs)
        print(
            f"{name:<20} {summary[f'{name}_tok_s']:>12.1f} {seconds:>9.1f} {cpu_seconds:>12.1f}"
            f"  {each}"
        )
    print()
    print(
        f"adapter cold load (disk -> slot) p50 {summary['adapter_cold_load_ms_p50']:.1f} ms, "
        f"p99 {summary['adapter_cold_load_ms_p99']:.1f} ms"
    )
    for key in (
        "zipf_over_base",
        "multi_lora_over_base",
        "multi_lora_over_peft_mixed",
        "multi_lora_over_peft_sequential",
    ):
        print(f"{key:<32} {summary[key]:6.2f}x")


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a small model and workload (< 3 min on 2 CPUs)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed runs per configuration (default: 5 with --quick, else 3)"
    )
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=DEFAULT.quantization)
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=DEFAULT.compute_dtype)
    parser.add_argument("--device", default=DEFAULT.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--max-step-tokens",
        type=int,
        default=DEFAULT.max_step_tokens,
        help="engine tokens per step",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the random model and adapters are written once and reused",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = replace(
        preset,
        repeats=args.repeats or preset.repeats,
        quantization=args.quantization,
        compute_dtype=args.compute_dtype,
        device=args.device,
        max_step_tokens=args.max_step_tokens,
    )
    return config, args.cache_dir, args.out


def main(argv: list[str] | None = None) -> None:
    config, cache_root, out = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    runs, device, setup_seconds, cold_load = setup(config, cache_root)
    low, high = config.prompt_tokens
    print(
        f"{config.num_requests} requests, prompts {low}-{high} tokens, {config.new_tokens} new "
        f"tokens, {config.quantization}/{config.compute_dtype} on {device}; setup "
        + ", ".join(f"{k} {v:.1f} s" for k, v in setup_seconds.items()),
        flush=True,
    )
    results = measure(runs, device, config.repeats)
    summary = report(config, results, setup_seconds, device, cold_load())
    print_summary(summary)
    if out is not None:
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
