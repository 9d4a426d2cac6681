"""loraserve's engine in the benchmark: built once with every adapter in a slot, driven step by
step on the benchmark's thread, with the timings the ratios need.

  run_engine        every request submitted at once, stepped until idle
  decode_step_ms    the wall time of each step that decoded every request and prefilled none
  ttft_ms           time to first token of a first wave of requests and a second wave that
                    arrives mid-run, from each request's submission
  run_prefix        TTFT of a burst of requests whose prompts start with a prefix per adapter
                    that earlier requests on those adapters already sent
  json_schemas      one JSON schema per request whose language no request can finish in its
                    new tokens, so a constrained request generates exactly as many

Knows nothing about the baselines or the report.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common import Workload, check_generated
from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.engine.sequence import EmitFn, Event
from loraserve.model.loading import load_base_model
from loraserve.types import (
    Constraint,
    ConstraintKind,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)

KV_BLOCK_SIZE = 16


def engine_config(
    base: EngineConfig, workload: Workload, max_prompt: int, concurrent: int | None = None
) -> EngineConfig:
    """Sized to run `concurrent` requests (default: the whole workload) in one continuous
    batch, one device slot per request. The prefix cache is off: a throughput run repeats the
    same prompts, which must be computed every time (`run_prefix` measures the cache)."""
    concurrent = concurrent or len(workload.prompts)
    per_request = math.ceil((max_prompt + workload.new_tokens) / KV_BLOCK_SIZE) * KV_BLOCK_SIZE
    return base.model_copy(
        update=dict(
            device_slots=len(workload.prompts),
            kv_cache_tokens=concurrent * per_request,
            kv_block_size=KV_BLOCK_SIZE,
            max_context=max_prompt + workload.new_tokens,
            max_batch_size=concurrent,
            prefix_caching=False,
        )
    )


def build_engine(
    settings: EngineConfig, adapter_dirs: dict[str, Path], record_decode_steps: bool = True
) -> EngineCore:
    """The engine with every adapter registered and already in its device slot, and, with
    `record_decode_steps`, the CPU decode records of every batch size made, as `loraserve
    serve` makes them before its first request (else each is made by the first step that needs
    it, inside whatever run is being timed)."""
    loaded = load_base_model(
        settings.model,
        settings.quantization,
        settings.compute_dtype,
        settings.device,
        settings.double_quant,
        settings.quantize_output,
    )
    core = EngineCore(loaded, settings)
    for name, directory in adapter_dirs.items():
        core.adapters.prefetch(core.adapters.load(name, directory))
    if not core.adapters.wait_for_loads(timeout=600):
        raise RuntimeError("adapters did not load within 10 minutes")
    if record_decode_steps:
        core.record_decode_steps()
    return core


@dataclass
class Trace:
    """What one engine run saw: per-step wall times and per-request token times."""

    step_seconds: list[float] = field(default_factory=list)
    submitted: dict[int, float] = field(default_factory=dict)  # request -> perf_counter
    token_times: dict[int, list[float]] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    tokens_after_step: list[int] = field(default_factory=list)  # tokens emitted so far
    errors: list[Exception] = field(default_factory=list)

    def sink(self, request: int) -> EmitFn:
        self.token_times[request], self.token_ids[request] = [], []

        def emit(event: Event) -> None:
            if isinstance(event, TokenEvent):
                self.token_times[request].append(time.perf_counter())
                self.token_ids[request].append(event.token_id)
            elif isinstance(event, Exception):
                self.errors.append(event)

        return emit

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_times.values())


def json_schemas(count: int) -> tuple[str, ...]:
    """`count` distinct schemas: an object holding an array of at least 1,000 records (an id, a
    tag from the request's own enum, a score and a flag), so no output completes it early."""
    return tuple(
        json.dumps({
            "type": "object",
            "properties": {"rows": {
                "type": "array",
                "minItems": 1000,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 0, "maximum": 10**6},
                        "tag": {"enum": [f"tag-{i}-{j}" for j in range(8)]},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "ok": {"type": "boolean"},
                    },
                    "required": ["id", "tag", "score", "ok"],
                    "additionalProperties": False,
                },
            }},
            "required": ["rows"],
            "additionalProperties": False,
        })
        for i in range(count)
    )  # fmt: skip


def submit(core: EngineCore, trace: Trace, workload: Workload, with_adapters: bool) -> None:
    """Every request of `workload` at once; eos ignored (a constrained one ends with its grammar
    only, which json_schemas keeps from happening)."""
    for i, (prompt, adapter) in enumerate(zip(workload.prompts, workload.adapters)):
        sampling = SamplingParams(max_new_tokens=workload.new_tokens_of(i), ignore_eos=True)
        if workload.schemas:
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, workload.schemas[i])
            sampling = replace(sampling, constraint=constraint)
        request = GenerateRequest(
            prompt_token_ids=prompt, adapter=adapter if with_adapters else None, sampling=sampling
        )
        index = len(trace.submitted)
        trace.submitted[index] = time.perf_counter()
        core.add_request(request, trace.sink(index))


def step_until_idle(core: EngineCore, trace: Trace, joiners: dict[int, Workload] | None = None,
                    with_adapters: bool = True) -> None:  # fmt: skip
    """Step until idle; `joiners[n]` is submitted after the n-th step.

    A step that finds nothing to run (every waiting request waits on an adapter load) is
    followed by a wait for the loader's wake-up, as the server's engine thread does: polling
    instead held the GIL against the loader's Python, and slowed 128 adapters' loads into 64
    slots by a third (benchmarks/RESULTS.md, 2026-12-06)."""
    joiners = dict(joiners or {})
    steps = 0
    while core.has_work() or joiners:
        if steps in joiners:
            submit(core, trace, joiners.pop(steps), with_adapters)
        start = time.perf_counter()
        progressed = core.step()
        trace.step_seconds.append(time.perf_counter() - start)
        trace.tokens_after_step.append(trace.tokens)
        steps += 1
        if not progressed and core.has_work():
            for task in core.inbox.take(block=True):
                task()
    if trace.errors:
        raise trace.errors[0]


def run_engine(core: EngineCore, workload: Workload, with_adapters: bool) -> Trace:
    """Submit every request at once, step until idle; checks every request's token count."""
    trace = Trace()
    submit(core, trace, workload, with_adapters)
    step_until_idle(core, trace)
    counts = [len(trace.token_times[i]) for i in range(len(workload.prompts))]
    check_generated("engine", counts, [workload.new_tokens_of(i) for i in range(len(counts))])
    return trace


@dataclass(frozen=True)
class TimedRun:
    """One run of a workload: its wall time, and each request's generated tokens in order."""

    seconds: float
    tokens: list[list[int]]


def timed_run(core: EngineCore, workload: Workload, with_adapters: bool) -> TimedRun:
    """`run_engine`, timed, with each request's tokens."""
    start = time.perf_counter()
    trace = run_engine(core, workload, with_adapters)
    seconds = time.perf_counter() - start
    return TimedRun(seconds, [trace.token_ids[i] for i in range(len(workload.prompts))])


def alternate_decode_steps(cores: dict[str, EngineCore], workload: Workload, repeats: int,
                           with_adapters: bool) -> dict[str, list[float]]:  # fmt: skip
    """Each engine's decode steps of `workload`, `repeats` times, the engines' steps
    alternating (the first to go changes every step) so that all see the same machine at the
    same moments; each round's prefill is not timed."""
    steps: dict[str, list[float]] = {name: [] for name in cores}
    for repeat in range(repeats):
        for core in cores.values():
            submit(core, Trace(), workload, with_adapters)
            core.step()
        turn = repeat
        while any(core.has_work() for core in cores.values()):
            order = list(cores) if turn % 2 else list(cores)[::-1]
            for name in order:
                if cores[name].has_work():
                    started = time.perf_counter()
                    cores[name].step()
                    steps[name].append(time.perf_counter() - started)
            turn += 1
    return steps


def decode_step_seconds(trace: Trace, requests: int) -> list[float]:
    """The steps after the first when the first step prefilled every request (each then
    decodes one token per step): one decode step of `requests` rows each."""
    if not trace.tokens_after_step or trace.tokens_after_step[0] != requests:
        raise RuntimeError("the first step did not prefill every request; raise max_step_tokens")
    return trace.step_seconds[1:]


def ttft_ms(trace: Trace) -> list[float]:
    """Each request's time to first token, from its submission, in milliseconds."""
    return [(trace.token_times[i][0] - t) * 1e3 for i, t in trace.submitted.items()]


@dataclass(frozen=True)
class PrefixWorkload:
    """`warm` (one request per adapter) runs first and finishes; then `burst` arrives at once.
    Every request of an adapter starts with that adapter's shared prefix."""

    warm: Workload
    burst: Workload


def prefix_workload(
    prefix_tokens: int, suffix_tokens: int, adapters: list[str], requests: int, new_tokens: int,
    vocab: int, first_id: int, seed: int = 0,
) -> PrefixWorkload:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(first_id, vocab, (n,), generator=gen).tolist())

    prefixes = {a: tokens(prefix_tokens) for a in adapters}
    burst = [adapters[i % len(adapters)] for i in range(requests)]
    return PrefixWorkload(
        Workload(tuple(prefixes[a] + tokens(suffix_tokens) for a in adapters), tuple(adapters),
                 new_tokens),
        Workload(tuple(prefixes[a] + tokens(suffix_tokens) for a in burst), tuple(burst),
                 new_tokens),
    )  # fmt: skip


def run_prefix(core: EngineCore, w: PrefixWorkload) -> tuple[list[float], list[list[int]]]:
    """TTFT (ms) of the burst after the warm requests finished, and the burst's tokens."""
    run_engine(core, w.warm, with_adapters=True)
    trace = Trace()
    submit(core, trace, w.burst, with_adapters=True)
    step_until_idle(core, trace)
    return ttft_ms(trace), [trace.token_ids[i] for i in range(len(w.burst.prompts))]
