"""Multi-LoRA throughput: this engine against transformers and HF PEFT, side by side on one
quantized base, with the machine's own matmul peak measured in the same run.

Generated tokens per second (prefill included in the wall time) for configurations that share
one random-weight Llama-shaped base, one set of rank-16 adapters on all seven projections, one
set of prompts and one output length:

  engine_base         this engine, every request on the base model (no adapter)
  engine_multi_lora   this engine, every request on a different adapter, one continuous batch
  engine_multi_lora_bf16_slots
                      the same with `lora_slot_dtype="bf16"` (the adapters, stored in fp32, are
                      rounded to bf16 in the slots: a speed figure, not a parity one); fp32
                      compute only (in bf16 the slots already are)
  engine_multi_lora_bf16_adapters
                      engine_multi_lora with the same adapters stored in bf16 (as adapters
                      trained in bf16 are), default settings: fp32 slots hold them as bf16
                      rows, exactly; fp32 compute only
  engine_multi_lora_fp16_adapters
                      the same with the adapters stored in fp16: held as fp16 rows, exactly
  engine_base_eager, engine_multi_lora_eager
                      engine_base and engine_multi_lora with `cuda_graphs` off: every decode
                      step launches its kernels one by one (on a GPU only)
  engine_constrained  engine_multi_lora with every request constrained to its own JSON schema
                      (compiled in the warm-up, so the timed runs find it cached)
  hf_generate_base    transformers `generate` on the base: all requests in one left-padded batch
                      (on a CPU with AVX512-BF16 bitsandbytes computes it in bf16, whatever the
                      compute dtype)
  hf_generate_base_fp32_kernels
                      the same with bitsandbytes' bf16 CPU path off: fp32 arithmetic, as the
                      engine's (fp32 compute on a CPU with AVX512-BF16 only)
  peft_mixed_batch    HF PEFT `generate(adapter_names=...)`: one left-padded batch
  peft_mixed_batch_fp32_kernels
                      the same with bitsandbytes' bf16 CPU path off (as
                      hf_generate_base_fp32_kernels)
  peft_sequential     HF PEFT, one request at a time, `set_adapter` before each
  engine_zipf         this engine, 4x the requests over 1,000 registered adapters drawn
                      Zipf(alpha=1), 32 device slots, a host tier smaller than the adapters
                      (but large enough for those the requests draw): in steady state, the
                      adapters moving between the host tier and the slots every run
  engine_zipf_cold_host
                      its warm-up: the same requests while the host tier is still empty, so
                      every adapter also comes from disk (one run, reported beside it)

and, from the same run: the best dense matmul (GFLOP/s, compute dtype) and the model FLOPs per
second of engine_base against it; the wall time of one decode step of every request against
that step's FLOPs at the peak; time to first token with one wave of requests arriving together
and a second wave mid-run; time to first token of a burst whose prompts share a 512-token
prefix per adapter (4 adapters) that earlier requests sent, with the prefix cache and without;
adapter cold-load latency (disk to a ready slot, sampled after every round); the bytes of the
quantized projections against bf16; the RSS growth of 10,000 stored adapters.

Every request generates exactly the configured number of tokens (greedy; `ignore_eos` for the
engine, `min_new_tokens == max_new_tokens` for HF). Model and adapter loading happen before any
timing. Each configuration is warmed up once on a small slice of the workload (the Zipf one on
its whole workload, so that every timed round starts from the same tiers), then they run
in `--repeats` rounds and the medians are reported, because the machines this runs on are
noisy: each round runs the short configurations (the engine's on 32 requests and plain
`generate`, seconds each) three times, interleaved, then the slow ones (PEFT, Zipf) once. The
random model and adapters are written once into a cache directory and reused.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_multi_lora.py --quick   # small; a few minutes on 2 CPUs
    .venv/bin/python benchmarks/bench_multi_lora.py --out results.json --repeats 3

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

from loraserve.model.bitsandbytes_offline import bnb

import torch
import transformers

from adapter_cache import (
    COLD_LOADS,
    ZIPF_ADAPTERS,
    ZIPF_HOST_FRACTION,
    ZIPF_SLOTS,
    build_zipf_engine,
    cold_load_ms,
    dora_cold_load_ms,
    percentile,
    summarize_cold_loads,
    zipf_choices,
)
from common import (
    DEFAULT_CACHE_DIR,
    ModelSpec,
    Run,
    RunFn,
    Workload,
    prepare_lora_adapters,
    prepare_model,
    stored_in,
    timed,
)
from engine_runs import (
    PrefixWorkload,
    Trace,
    build_engine,
    decode_step_seconds,
    engine_config,
    json_schemas,
    prefix_workload,
    run_engine,
    run_prefix,
    step_until_idle,
    submit,
    ttft_ms,
)
from hf_baselines import load_hf, load_peft, run_hf_generate, run_peft_mixed, run_peft_sequential
from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.model.loading import DTYPES, QUANTIZATIONS, load_base_model, quantized_bytes
from loraserve.model.tiny import SPECIAL_TOKENS
from machine import Shapes, decode_flops, machine_info, matmul_gflops, model_flops
from memory import prepare_store, registered_rss_mb

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WARMUP_REQUESTS, WARMUP_NEW_TOKENS = 4, 2
CONFIGURATIONS = (
    "engine_base",
    "engine_multi_lora",
    "engine_base_eager",
    "engine_multi_lora_eager",
    "engine_multi_lora_bf16_slots",
    "engine_multi_lora_bf16_adapters",
    "engine_multi_lora_fp16_adapters",
    "engine_constrained",
    "hf_generate_base",
    "hf_generate_base_fp32_kernels",
    "peft_mixed_batch",
    "peft_mixed_batch_fp32_kernels",
    "peft_sequential",
    "engine_zipf",
    "engine_zipf_cold_host",
)
# Configurations warmed up on their whole workload, and the name their warm-up is reported as:
# the Zipf run's first pass reads its adapters from disk into the host tier, which the timed
# rounds then find full (with a slice only, the first round read them and the second did not:
# 328 against 369 tokens per second, 2026-12-01, so the median of two was their mean).
WHOLE_WARMUP = {"engine_zipf": "engine_zipf_cold_host"}
# Configurations of seconds each: each round runs them INTERLEAVED_RUNS_PER_ROUND times
INTERLEAVED = (
    "engine_base",
    "engine_multi_lora",
    "engine_base_eager",
    "engine_multi_lora_eager",
    "engine_multi_lora_bf16_slots",
    "engine_multi_lora_bf16_adapters",
    "engine_multi_lora_fp16_adapters",
    "engine_constrained",
    "hf_generate_base",
    "hf_generate_base_fp32_kernels",
)
INTERLEAVED_RUNS_PER_ROUND = 3
ZIPF_REQUEST_FACTOR = 4  # the Zipf workload has 4x the requests, batched to the same size
TTFT_WAVES = 2  # a second wave as large as the first joins halfway through its decode
# Prefix caching: requests over PREFIX_ADAPTERS adapters, each adapter's prompts sharing a prefix
PREFIX_TOKENS, PREFIX_SUFFIX_TOKENS, PREFIX_ADAPTERS, PREFIX_NEW_TOKENS = 512, 16, 4, 8


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
    batch_invariant: bool = False


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
# Random bases by name, for the scripts that take `--model`: the default's, and one of TinyLlama
# 1.1B's shape (hidden 2048, 22 layers, 32 query heads over 4 kv heads, vocabulary 32,000), a
# size served on CPUs, where a token's weights outweigh the host's work per layer.
BASES = {
    "default": DEFAULT.model,
    "tinyllama-1.1b": ModelSpec(2048, 5632, 22, 32, 4, 32000),
}
QUICK = replace(
    DEFAULT,
    model=ModelSpec(512, 1408, 4, 8, 8, 8000),
    num_requests=8,
    prompt_tokens=(32, 64),
    new_tokens=16,
    repeats=5,
)


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


@dataclass(frozen=True)
class DefaultBench:
    """The default configuration in one compute dtype, its base and adapters on disk, and its
    workload (32 requests, each on its own adapter)."""

    config: BenchConfig
    model_dir: Path
    adapters: dict[str, Path]
    workload: Workload

    def engine_settings(self) -> EngineConfig:
        """An engine's settings for the workload, as the benchmark's engines have them."""
        base = base_engine_config(self.config, self.model_dir)
        return engine_config(base, self.workload, self.config.prompt_tokens[1])


def default_bench(compute_dtype: str) -> DefaultBench:
    """The default configuration computing in `compute_dtype`, its files written on first use."""
    config = replace(DEFAULT, compute_dtype=compute_dtype)
    model_dir = prepare_model(config.model, DEFAULT_CACHE_DIR)
    adapters = prepare_lora_adapters(
        model_dir, config.num_requests, config.rank, config.alpha, TARGETS, config.seed
    )
    return DefaultBench(config, model_dir, adapters, make_workload(config, list(adapters)))


@dataclass
class Setup:
    """Everything loaded before timing starts."""

    runs: dict[str, tuple[RunFn, Workload]]
    core: EngineCore  # engine_base and engine_multi_lora, sized for two waves
    workload: Workload
    traces: dict[str, list[Trace]]  # configuration -> one engine trace per timed run
    seconds: dict[str, float]
    model_dir: Path
    adapter_dirs: dict[str, Path]
    base: EngineConfig  # the engine settings every engine here starts from


def engine_run(core: EngineCore, traces: list[Trace], with_adapters: bool, w: Workload) -> int:
    trace = run_engine(core, w, with_adapters)
    traces.append(trace)
    return trace.tokens


def base_engine_config(config: BenchConfig, model_dir: Path) -> EngineConfig:
    """The engine settings every engine run of `config` starts from."""
    return EngineConfig(
        model=str(model_dir),
        quantization=config.quantization,
        compute_dtype=config.compute_dtype,
        device=config.device,
        max_rank=config.rank,
        max_step_tokens=config.max_step_tokens,
        batch_invariant=config.batch_invariant,
    )


def setup(config: BenchConfig, cache_root: Path) -> Setup:
    """Build every artifact and load every model."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model_dir = prepare_model(config.model, cache_root)
    adapter_dirs = prepare_lora_adapters(
        model_dir, config.num_requests, config.rank, config.alpha, TARGETS, config.seed
    )
    workload = make_workload(config, list(adapter_dirs))
    seconds["artifacts"] = time.perf_counter() - start

    base = base_engine_config(config, model_dir)
    high = config.prompt_tokens[1]
    start = time.perf_counter()
    settings = engine_config(base, workload, high, TTFT_WAVES * len(workload.prompts))
    core = build_engine(settings, adapter_dirs)
    seconds["engine"] = time.perf_counter() - start
    start = time.perf_counter()
    bf16_slots_core = None  # in a 16-bit compute dtype: 16-bit slots
    stored_16_cores = {}  # the adapters stored in 16 bits, by the dtype's name (fp32 compute)
    if config.compute_dtype == "fp32":
        bf16_slots = settings.model_copy(update={"lora_slot_dtype": "bf16"})
        bf16_slots_core = build_engine(bf16_slots, adapter_dirs)
        seconds["engine_bf16_slots"] = time.perf_counter() - start
        for name, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            start = time.perf_counter()
            stored_16_cores[name] = build_engine(settings, stored_in(adapter_dirs, half))
            seconds[f"engine_{name}_adapters"] = time.perf_counter() - start
    eager_core = None  # CUDA graphs off: on a GPU only (a CPU never captures them)
    if core.device.type == "cuda":
        start = time.perf_counter()
        eager_core = build_engine(settings.model_copy(update={"cuda_graphs": False}), adapter_dirs)
        seconds["engine_eager"] = time.perf_counter() - start
    start = time.perf_counter()
    zipf_core = build_zipf_engine(engine_config(base, workload, high), list(adapter_dirs.values()))
    count = ZIPF_REQUEST_FACTOR * len(workload.prompts)
    names = [f"zipf-{i}" for i in range(ZIPF_ADAPTERS)]
    zipf = Workload(
        tuple(workload.prompts[i % len(workload.prompts)] for i in range(count)),
        tuple(zipf_choices(count, names, config.seed)),
        workload.new_tokens,
    )
    seconds["engine_zipf"] = time.perf_counter() - start
    start = time.perf_counter()
    hf = load_hf(model_dir, config.quantization, config.compute_dtype, config.device)
    seconds["hf_generate_base"] = time.perf_counter() - start
    # bitsandbytes' bf16 path runs under fp32 compute on AVX512-BF16 CPUs only
    fp32_kernels = (
        config.compute_dtype == "fp32"
        and hf.device.type == "cpu"
        and bnb.functional.has_avx512bf16()
    )
    hf_fp32 = None
    if fp32_kernels:
        hf_fp32 = load_hf(
            model_dir, config.quantization, config.compute_dtype, config.device, False
        )
    start = time.perf_counter()
    peft, peft_loaded = load_peft(
        model_dir, adapter_dirs, config.quantization, config.compute_dtype, config.device
    )
    seconds["peft"] = time.perf_counter() - start
    peft_fp32 = None
    if fp32_kernels:
        peft_fp32 = load_peft(
            model_dir, adapter_dirs, config.quantization, config.compute_dtype, config.device,
            False,
        )  # fmt: skip

    traces: dict[str, list[Trace]] = {name: [] for name in CONFIGURATIONS}
    runs: dict[str, tuple[RunFn, Workload]] = {
        "engine_base": (partial(engine_run, core, traces["engine_base"], False), workload),
        "engine_multi_lora": (
            partial(engine_run, core, traces["engine_multi_lora"], True), workload,
        ),
        "engine_constrained": (
            partial(engine_run, core, traces["engine_constrained"], True),
            replace(workload, schemas=json_schemas(len(workload.prompts))),
        ),
        "hf_generate_base": (partial(run_hf_generate, hf), workload),
        "peft_mixed_batch": (partial(run_peft_mixed, peft, peft_loaded), workload),
        "peft_sequential": (partial(run_peft_sequential, peft, peft_loaded), workload),
        "engine_zipf": (partial(engine_run, zipf_core, traces["engine_zipf"], True), zipf),
    }  # fmt: skip
    if hf_fp32 is not None:
        runs["hf_generate_base_fp32_kernels"] = (partial(run_hf_generate, hf_fp32), workload)
    if peft_fp32 is not None:
        runs["peft_mixed_batch_fp32_kernels"] = (partial(run_peft_mixed, *peft_fp32), workload)
    for name, other_core, with_adapters in (
        ("engine_multi_lora_bf16_slots", bf16_slots_core, True),
        ("engine_multi_lora_bf16_adapters", stored_16_cores.get("bf16"), True),
        ("engine_multi_lora_fp16_adapters", stored_16_cores.get("fp16"), True),
        ("engine_base_eager", eager_core, False),
        ("engine_multi_lora_eager", eager_core, True),
    ):
        if other_core is not None:
            runs[name] = (partial(engine_run, other_core, traces[name], with_adapters), workload)
    return Setup(runs, core, workload, traces, seconds, model_dir, adapter_dirs, base)


def rounds(names: list[str], repeats: int) -> list[list[str]]:
    """The timed runs, round by round: `repeats` rounds; in each, the configurations named in
    INTERLEAVED run INTERLEAVED_RUNS_PER_ROUND times, in alternating order, then the others once.

    On a machine whose speed drifts from minute to minute, a ratio of two short configurations
    is only as good as the number of adjacent runs behind it: more of them, interleaved, steady
    each median without more runs of the slow baselines.
    """
    interleaved = [n for n in names if n in INTERLEAVED]
    others = [n for n in names if n not in INTERLEAVED]
    one_round = []
    for i in range(INTERLEAVED_RUNS_PER_ROUND):
        one_round += interleaved if i % 2 == 0 else interleaved[::-1]
    return [one_round + others for _ in range(repeats)]


def measure(
    runs: dict[str, tuple[RunFn, Workload]],
    device: torch.device,
    repeats: int,
    after_round: Callable[[], None],
) -> dict[str, list[Run]]:
    """Warm each configuration up once (see WHOLE_WARMUP), then time them in `rounds`, calling
    `after_round` after each round."""
    warm_ups: dict[str, list[Run]] = {}
    for name, (fn, workload) in runs.items():
        whole = name in WHOLE_WARMUP
        warm_up = workload if whole else workload.head(WARMUP_REQUESTS, WARMUP_NEW_TOKENS)
        run = timed(partial(fn, warm_up), device)
        print(f"warm-up {name:<18} {run.seconds:7.1f} s", flush=True)
        if whole:
            warm_ups[WHOLE_WARMUP[name]] = [run]
    results: dict[str, list[Run]] = {name: [] for name in runs}
    for number, names in enumerate(rounds(list(runs), repeats), 1):
        for name in names:
            fn, workload = runs[name]
            run = timed(partial(fn, workload), device)
            results[name].append(run)
            print(
                f"round {number}/{repeats} {name:<18} {run.seconds:7.1f} s {run.tok_s:9.1f} tok/s",
                flush=True,
            )
        after_round()
    return results | warm_ups


def measure_ttft(core: EngineCore, workload: Workload, repeats: int) -> list[float]:
    """TTFT (ms) of one wave submitted together and an equal wave halfway through its decode,
    pooled over `repeats` runs."""
    pooled: list[float] = []
    for _ in range(repeats):
        trace = Trace()
        submit(core, trace, workload, with_adapters=True)
        step_until_idle(core, trace, joiners={workload.new_tokens // 2: workload})
        pooled.extend(ttft_ms(trace))
    return pooled


def measure_prefix(config: BenchConfig, s: Setup, base: EngineConfig) -> dict:
    """TTFT p50 of a burst whose prompts share a cached prefix per adapter, without the prefix
    cache against with it, and whether the greedy outputs are identical."""
    adapters = dict(list(s.adapter_dirs.items())[:PREFIX_ADAPTERS])

    # The warm-up and each timed run get prompts of their own (prefixes and suffixes): a run
    # finds cached only the prefixes its warm requests just sent, never a whole earlier prompt.
    def workload(seed: int) -> PrefixWorkload:
        return prefix_workload(
            PREFIX_TOKENS, PREFIX_SUFFIX_TOKENS, list(adapters), config.num_requests,
            PREFIX_NEW_TOKENS, config.model.vocab_size, len(SPECIAL_TOKENS), seed,
        )  # fmt: skip

    workloads = [workload(config.seed + run) for run in range(config.repeats + 1)]
    ttfts: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[list[int]]] = {True: [], False: []}
    settings = engine_config(base, workloads[0].burst, PREFIX_TOKENS + PREFIX_SUFFIX_TOKENS)
    for caching in (True, False):
        core = build_engine(settings.model_copy(update={"prefix_caching": caching}), adapters)
        run_prefix(core, workloads[0])  # warm-up
        for w in workloads[1:]:
            times, tokens = run_prefix(core, w)
            ttfts[caching] += times
            outputs[caching] += tokens
        del core
    with_cache, without = statistics.median(ttfts[True]), statistics.median(ttfts[False])
    identical = outputs[True] == outputs[False]
    # Where the cache changed a greedy token: does re-batching alone change one too? In a 16-bit
    # compute dtype it can (GEMMs round differently at other row counts). None: not asked.
    first = workloads[1]
    uncached = outputs[False][: len(first.burst.prompts)]  # the first timed run's tokens
    rebatched = None if identical else uncached == rebatched_tokens(settings, adapters, first)
    return {
        "prefix_ttft_ms_p50_cached": with_cache,
        "prefix_ttft_ms_p50_uncached": without,
        "prefix_ttft_speedup": without / with_cache,
        "prefix_outputs_identical": identical,
        "rebatched_outputs_identical": rebatched,
    }


def rebatched_tokens(
    settings: EngineConfig, adapters: dict[str, Path], w: PrefixWorkload
) -> list[list[int]]:
    """The burst's greedy tokens without the prefix cache (`settings` has it off), its prefill
    split into steps of a quarter the tokens `settings` gives it."""
    quarter = settings.model_copy(update={"max_step_tokens": settings.max_step_tokens // 4})
    return run_prefix(build_engine(quarter, adapters), w)[1]


# ---- reporting -----------------------------------------------------------------------------


RATIOS = {  # name: (numerator, denominator)
    "engine_over_hf_generate_base": ("engine_base", "hf_generate_base"),
    "engine_over_hf_generate_base_fp32_kernels": ("engine_base", "hf_generate_base_fp32_kernels"),
    "multi_lora_over_base": ("engine_multi_lora", "engine_base"),
    "graphs_speedup_base": ("engine_base", "engine_base_eager"),
    "graphs_speedup_multi_lora": ("engine_multi_lora", "engine_multi_lora_eager"),
    "multi_lora_bf16_slots_over_base": ("engine_multi_lora_bf16_slots", "engine_base"),
    "multi_lora_bf16_adapters_over_base": ("engine_multi_lora_bf16_adapters", "engine_base"),
    "multi_lora_fp16_adapters_over_base": ("engine_multi_lora_fp16_adapters", "engine_base"),
    "constrained_over_multi_lora": ("engine_constrained", "engine_multi_lora"),
    "zipf_over_base": ("engine_zipf", "engine_base"),
    "zipf_cold_host_over_base": ("engine_zipf_cold_host", "engine_base"),
    "multi_lora_over_peft_mixed": ("engine_multi_lora", "peft_mixed_batch"),
    "multi_lora_over_peft_mixed_fp32_kernels": (
        "engine_multi_lora",
        "peft_mixed_batch_fp32_kernels",
    ),
    "multi_lora_over_peft_sequential": ("engine_multi_lora", "peft_sequential"),
}


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """Every ratio whose two configurations were measured."""
    return {
        name: medians[top] / medians[bottom]
        for name, (top, bottom) in RATIOS.items()
        if top in medians and bottom in medians
    }


def compute_report(config: BenchConfig, s: Setup, results: dict[str, list[Run]], peak: float,
                   ttfts: list[float], cold_loads: list[float], extra: dict) -> dict:  # fmt: skip
    medians = {name: statistics.median(r.tok_s for r in runs) for name, runs in results.items()}
    shapes = Shapes.of(s.core.runner.model.config)
    lengths = [len(p) for p in s.workload.prompts]
    flops = model_flops(shapes, lengths, s.workload.new_tokens)
    base_seconds = statistics.median(r.seconds for r in results["engine_base"])
    timed_traces = s.traces["engine_base"][1:]  # the warm-up's trace is first
    steps = [t for trace in timed_traces for t in decode_step_seconds(trace, len(lengths))]
    middle = s.workload.new_tokens // 2
    step_flops = sum(decode_flops(shapes, p + middle) for p in lengths)
    decode_ms = statistics.median(steps) * 1e3
    at_peak_ms = step_flops / (peak * 1e9) * 1e3
    return {
        **{f"{name}_tok_s": value for name, value in medians.items()},
        **ratios(medians),
        "matmul_peak_gflops": peak,
        "engine_base_model_gflops": flops / base_seconds / 1e9,
        "engine_base_peak_ratio": flops / base_seconds / 1e9 / peak,
        "decode_step_ms_p50": decode_ms,
        "decode_step_ms_at_peak": at_peak_ms,
        "decode_step_over_peak": decode_ms / at_peak_ms,
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p99": percentile(ttfts, 0.99),
        "ttft_p99_over_p50": percentile(ttfts, 0.99) / statistics.median(ttfts),
        **summarize_cold_loads(cold_loads),
        **extra,
        "runs": {
            name: [{**asdict(r), "tok_s": r.tok_s} for r in runs] for name, runs in results.items()
        },
        "decode_step_ms": [t * 1e3 for t in steps],
        "ttft_ms": ttfts,
        "cold_loads_ms": cold_loads,
        "setup_seconds": s.seconds,
        "config": {
            **asdict(config),
            "resolved_device": str(s.core.device),
            "zipf": {
                "adapters": ZIPF_ADAPTERS,
                "device_slots": ZIPF_SLOTS,
                "host_budget_fraction": ZIPF_HOST_FRACTION,
                "requests": ZIPF_REQUEST_FACTOR * config.num_requests,
                "alpha": 1.0,
            },
            "runs_per_round": {
                name: INTERLEAVED_RUNS_PER_ROUND if name in INTERLEAVED else 1
                for name in CONFIGURATIONS
            },
            "ttft": {"waves": TTFT_WAVES, "second_wave_after_steps": config.new_tokens // 2},
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def print_summary(summary: dict) -> None:
    print()
    print(f"{'configuration':<20} {'median tok/s':>12} {'median s':>9} {'median cpu s':>12}  runs")
    for name in [c for c in CONFIGURATIONS if c in summary["runs"]]:
        runs = summary["runs"][name]
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu_seconds = statistics.median(r["cpu_seconds"] for r in runs)
        each = ", ".join(f"{r['tok_s']:.1f}" for r in runs)
        print(
            f"{name:<20} {summary[f'{name}_tok_s']:>12.1f} {seconds:>9.1f} {cpu_seconds:>12.1f}"
            f"  {each}"
        )
    print()
    for key, value in summary.items():
        if isinstance(value, float) and not key.endswith("_tok_s"):
            print(f"{key:<36} {value:10.3f}")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[BenchConfig, Path, Path | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and workload")
    parser.add_argument(
        "--repeats",
        type=int,
        help="rounds of timed runs (default: 5 with --quick, else 3); each round runs the short "
        f"configurations {INTERLEAVED_RUNS_PER_ROUND} times and the others once",
    )
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=DEFAULT.quantization)
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=DEFAULT.compute_dtype)
    parser.add_argument("--device", default=DEFAULT.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--checkpoint-dtype",
        choices=("fp32", "bf16"),
        default=DEFAULT.model.weights_dtype,
        help="how the random model's checkpoint stores its weights (published ones: bf16)",
    )
    parser.add_argument(
        "--max-step-tokens", type=int, default=DEFAULT.max_step_tokens, help="engine tokens/step"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help="where the random model and adapters are written once and reused",
    )
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="every engine with batch_invariant (each request's logits the same bits in any "
        "batch, chunking or prefix-cache hit)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=CONFIGURATIONS,
        default=list(CONFIGURATIONS),
        help="measure these configurations only (engine_base is always measured)",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    config = replace(
        preset,
        model=replace(preset.model, weights_dtype=args.checkpoint_dtype),
        repeats=args.repeats or preset.repeats,
        quantization=args.quantization,
        compute_dtype=args.compute_dtype,
        device=args.device,
        max_step_tokens=args.max_step_tokens,
        batch_invariant=args.batch_invariant,
    )
    only = {"engine_base", *args.only}
    return config, args.cache_dir, args.out, [c for c in CONFIGURATIONS if c in only]


def main(argv: list[str] | None = None) -> None:
    config, cache_root, out, only = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    s = setup(config, cache_root)
    device = s.core.device
    dtype = DTYPES[config.compute_dtype]
    low, high = config.prompt_tokens
    print(
        f"{config.num_requests} requests, prompts {low}-{high} tokens, {config.new_tokens} new "
        f"tokens, {config.quantization}/{config.compute_dtype} on {device}; setup "
        + ", ".join(f"{k} {v:.1f} s" for k, v in s.seconds.items()),
        flush=True,
    )
    peak = matmul_gflops(dtype, device)
    # Cold loads are sampled after every round, so that their median spans the run's minutes
    cold: list[float] = []
    adapter_dir = next(iter(s.adapter_dirs.values()))
    loads_per_round = math.ceil(COLD_LOADS / config.repeats)
    results = measure(
        {name: s.runs[name] for name in only if name in s.runs}, device, config.repeats,
        lambda: cold.extend(cold_load_ms(s.core, adapter_dir, loads_per_round)),
    )  # fmt: skip
    if out is not None:  # what is measured so far survives a failure in what follows
        partial = {name: [asdict(r) for r in runs] for name, runs in results.items()}
        out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2) + "\n")
    ttfts = measure_ttft(s.core, s.workload, config.repeats)
    prefix = measure_prefix(config, s, s.base)
    peak = max(peak, matmul_gflops(dtype, device))
    cold_dora = dora_cold_load_ms(s.core, s.model_dir, config.rank, config.alpha, TARGETS)
    sizes = quantized_bytes(s.core.runner.model)
    double = load_base_model(str(s.model_dir), config.quantization, config.compute_dtype, "cpu",
                             double_quant=True)  # fmt: skip
    sizes_dq = quantized_bytes(double.model)
    del double
    store_root = prepare_store(s.model_dir, s.model_dir.parent / "store-10k")
    extra = {
        "linear_bytes_nf4": sizes.quantized,
        "linear_bytes_nf4_dq": sizes_dq.quantized,
        "linear_bytes_bf16": sizes.bf16,
        "linear_bytes_ratio": sizes.quantized / sizes.bf16,
        "linear_bytes_dq_ratio": sizes_dq.quantized / sizes.bf16,
        **registered_rss_mb(s.model_dir, store_root),
        **prefix,
        **summarize_cold_loads(cold_dora, "dora"),
        "cold_loads_dora_ms": cold_dora,
    }
    summary = compute_report(config, s, results, peak, ttfts, cold, extra)
    print_summary(summary)
    if out is not None:
        out.write_text(json.dumps(summary, indent=2) + "\n")
        out.with_suffix(".partial.json").unlink(missing_ok=True)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
