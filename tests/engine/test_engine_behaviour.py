"""Engine behaviour a client can observe: batch invariance, cancellation, finish reasons,
the asyncio face, and admission control against the batch, KV, queue and step-token limits."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
from dataclasses import replace

import pytest
import torch
from tests.conftest import ADAPTER_SPECS
from tests.engine.helpers import Collected, make_core, run

from loraserve.engine.async_engine import AsyncEngine
from loraserve.model.compute_team import DecodeThreads, ThreadGovernor
from loraserve.types import (
    CapacityError,
    FinalEvent,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)

PROMPTS = [
    "LoRA adapts a frozen base model",
    "The quick brown fox",
    "A server holds one quantized base model",
    "def forward(self, x):",
    "Café, naïve 🙂",
    "QLoRA stores the base weights",
    "Continuous batching lets new requests join at step boundaries while others decode, and",
]
ADAPTERS = [spec.name for spec in ADAPTER_SPECS]
LOGIT_TOLERANCE = 1e-4  # unquantized fp32: only the batch around a row differs


def ready_core(model_dirs, adapter_dirs, quantization="none", **overrides):
    """A llama EngineCore with every test adapter registered and already in a device slot."""
    core = make_core(model_dirs["llama"], quantization, **overrides)
    for name, directory in adapter_dirs["llama"].items():
        assert core.adapters.prefetch(core.adapters.load(name, directory))
    assert core.adapters.wait_for_loads(timeout=60)
    return core


def request(prompt, adapter=None, max_new=12, **sampling) -> GenerateRequest:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, **sampling)
    if isinstance(prompt, str):
        return GenerateRequest(prompt=prompt, adapter=adapter, sampling=params)
    return GenerateRequest(prompt_token_ids=tuple(prompt), adapter=adapter, sampling=params)


def assert_consistent(core, req: GenerateRequest, got: Collected, reason: FinishReason) -> None:
    """The final event counts what was sent, and its text is the concatenated deltas."""
    assert got.error is None, got.error
    prompt_len = len(core.tokenizer.encode(req.prompt)) if req.prompt else len(req.prompt_token_ids)
    assert got.final == FinalEvent(reason, prompt_len, len(got.tokens), got.text)


def assert_idle(core) -> None:
    assert core.kv_used_tokens == 0
    assert core.num_running == core.num_waiting == 0
    assert core.adapters.stats().references == 0


@pytest.fixture(scope="module")
def core(model_dirs, adapter_dirs):
    """Unquantized, every adapter resident; tests using it must leave it idle."""
    core = ready_core(model_dirs, adapter_dirs, "none")
    yield core
    assert_idle(core)


# ---- batch invariance ------------------------------------------------------------------------

RUNNING = [
    request(PROMPTS[0], "r8-all", 10),
    request(PROMPTS[1], None, 10),
    request(PROMPTS[2], "r64-all", 10),
]
ARRIVING = {
    4: [request(PROMPTS[3], "r4-attn", 6), request(PROMPTS[6], "r16-mlp", 4)],
    7: [request(PROMPTS[4], "r1-qv", 4), request(PROMPTS[5], "r32-kv-up", 4)],
}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_arrivals_mid_decode_do_not_change_running_requests(quantization, model_dirs, adapter_dirs):
    # A small step-token cap makes the long arrival's prefill share steps with the decodes.
    core = ready_core(model_dirs, adapter_dirs, quantization, max_batch_size=8, max_step_tokens=16)
    alone = run(core, {0: RUNNING})
    busy = run(core, {0: RUNNING, **ARRIVING})

    for i, (want, got) in enumerate(zip(alone, busy)):
        assert got.tokens == want.tokens, f"running request {i}"
        if quantization == "none":
            for step, (a, b) in enumerate(zip(want.logits, got.logits)):
                diff = (a - b).abs().max().item()
                assert diff <= LOGIT_TOLERANCE, f"request {i} step {step}: {diff}"
    arrivals = [r for step in sorted(ARRIVING) for r in ARRIVING[step]]
    for req, got in zip(RUNNING + arrivals, busy):
        assert_consistent(core, req, got, FinishReason.LENGTH)
    assert_idle(core)


SEEDED = SamplingParams(
    max_new_tokens=12,
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    repetition_penalty=1.1,
    seed=1234,
    ignore_eos=True,
)


@pytest.mark.slow
def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(model_dirs, adapter_dirs):
    core = ready_core(model_dirs, adapter_dirs, "nf4")
    target = GenerateRequest(prompt=PROMPTS[0], adapter="r8-rslora", sampling=SEEDED)
    alone = run(core, {0: [target]})[0]
    sampled = {"temperature": 0.8, "top_k": 50}
    busy = run(
        core,
        {
            0: [
                request(PROMPTS[1], None, 10),
                request(PROMPTS[2], "r4-attn", 8, seed=7, **sampled),
            ],
            2: [request(PROMPTS[3], "r64-all", 12), target],
            3: [request(PROMPTS[4], "r16-mlp", 6, **sampled), request(PROMPTS[5], "r2-o-down", 8)],
            5: [target, request(PROMPTS[6], None, 6, temperature=1.3)],
        },
    )
    assert busy[3].tokens == alone.tokens
    assert busy[6].tokens == alone.tokens  # the same request again, on other rows and steps

    greedy = replace(SEEDED, temperature=0.0)
    *other_seeds, argmax = run(
        core,
        {
            0: [replace(target, sampling=replace(SEEDED, seed=s)) for s in (1, 2, 3)]
            + [replace(target, sampling=greedy)]
        },
    )
    distinct = {tuple(r.tokens) for r in other_seeds} | {tuple(alone.tokens)}
    assert len(distinct) == 4, "different seeds drew the same tokens"
    assert argmax.tokens != alone.tokens, "temperature 0.8 sampled the greedy tokens"
    assert_idle(core)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one compute thread: nothing to lower")
def test_decode_steps_on_fewer_threads_give_the_same_outputs(model_dirs, adapter_dirs):
    """A neighbour process never changes an output: with the decode steps' threads stepped down
    to one (as the governor does while other processes hold the CPUs), the same requests give
    the same tokens and logits, bit for bit. (No prefix cache: the second run would otherwise
    find the first's prompts cached and compute in other shapes.)"""
    core = ready_core(model_dirs, adapter_dirs, "nf4", prefix_caching=False)
    assert core.decode_threads is not None, "adaptive threads are on by default"
    arrivals = {
        0: [request(PROMPTS[0], None, 8), request(PROMPTS[1], "r8-all", 8)],
        1: [request(PROMPTS[2], "r4-attn", 6), request(PROMPTS[3], "r64-all", 8)],
    }
    every_thread = run(core, arrivals)
    # every decode step's cores count as taken and every change as paying, with no probe back:
    # two threads for the first decode step, one from the second on
    governor = ThreadGovernor(
        2, window_s=0.0, contended_share=-1.0, margin=-math.inf, first_hold_s=math.inf
    )
    core.decode_threads = DecodeThreads(governor)
    fewer = run(core, arrivals)
    assert core.decode_threads.threads == 1
    assert torch.get_num_threads() == core.max_threads  # between steps: every thread
    for want, got in zip(every_thread, fewer, strict=True):
        assert got.tokens == want.tokens
        assert all(torch.equal(a, b) for a, b in zip(want.logits, got.logits, strict=True))


# ---- cancellation ----------------------------------------------------------------------------


def test_cancel_frees_kv_at_the_next_step_and_others_finish(core):
    requests = [
        request(PROMPTS[0], "r8-all", 12),
        request(PROMPTS[6], "r4-attn", 12),
        request(PROMPTS[1], None, 12),
    ]
    sinks = [Collected() for _ in requests]
    ids = [core.add_request(r, s) for r, s in zip(requests, sinks)]
    for _ in range(3):
        core.step()
    assert core.num_running == 3
    refs = core.adapters.stats().references
    kv_before, generated = core.kv_used_tokens, len(sinks[1].tokens)
    prompt_len = len(core.tokenizer.encode(PROMPTS[6]))
    reserved = core.allocator.blocks_for(prompt_len + 12) * core.allocator.block_size

    core.cancel(ids[1])
    core.step()

    assert core.kv_used_tokens == kv_before - reserved
    assert core.num_running == 2
    assert core.adapters.stats().references == refs - 1
    assert generated == 3 and len(sinks[1].tokens) == generated
    assert_consistent(core, requests[1], sinks[1], FinishReason.CANCELLED)
    assert [len(s.tokens) for s in (sinks[0], sinks[2])] == [4, 4]
    while core.has_work():
        core.step()
    assert len(sinks[1].tokens) == generated
    for i in (0, 2):
        assert_consistent(core, requests[i], sinks[i], FinishReason.LENGTH)
        assert len(sinks[i].tokens) == 12
    core.cancel(ids[0])  # finished already: nothing to do
    assert_idle(core)


def test_cancel_a_waiting_request_before_it_runs(model_dirs):
    core = make_core(model_dirs["llama"], "none", max_batch_size=1, max_step_tokens=16)
    first, queued = request(PROMPTS[0], None, 6), request(PROMPTS[1], None, 6)
    sinks = Collected(), Collected()
    core.add_request(first, sinks[0])
    queued_id = core.add_request(queued, sinks[1])
    core.step()
    assert (core.num_running, core.num_waiting) == (1, 1)

    core.cancel(queued_id)
    core.step()
    assert core.num_waiting == 0
    assert sinks[1].tokens == []
    assert_consistent(core, queued, sinks[1], FinishReason.CANCELLED)
    while core.has_work():
        core.step()
    assert_consistent(core, first, sinks[0], FinishReason.LENGTH)
    assert_idle(core)


async def test_closing_the_stream_cancels_and_frees_kv(core):
    engine = AsyncEngine(core)
    try:
        stream = await engine.generate(request(PROMPTS[0], "r8-all", 400))
        events = [await asyncio.wait_for(anext(stream), 30) for _ in range(2)]
        assert all(isinstance(e, TokenEvent) for e in events)
        assert core.kv_used_tokens > 0
        closed_at = core.steps
        await stream.aclose()
        for _ in range(2000):  # at most ~10 s, in 5 ms polls; a step takes milliseconds
            if core.kv_used_tokens == 0 and core.num_running == 0:
                break
            await asyncio.sleep(0.005)
        assert core.kv_used_tokens == 0 and core.num_running == 0
        assert core.steps - closed_at <= 3, "the request ran on after its stream was closed"
    finally:
        engine.shutdown()
    assert_idle(core)


async def test_a_caller_gone_while_its_request_is_prepared_leaves_nothing_queued(core, monkeypatch):
    """Requests are tokenized on a worker thread; a caller cancelled meanwhile must not leave
    its sequence counted against the queue's bounds."""
    engine = AsyncEngine(core)
    started, release = threading.Event(), threading.Event()
    prepare = core.make_sequence

    def slow_prepare(req, emit):
        started.set()
        assert release.wait(30)
        return prepare(req, emit)

    monkeypatch.setattr(core, "make_sequence", slow_prepare)
    try:
        caller = asyncio.ensure_future(engine.generate(request(PROMPTS[0], None, 50)))
        assert await asyncio.to_thread(started.wait, 30)
        assert not caller.done(), "generate must wait for the worker thread, not run on the loop"
        caller.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(2000):  # at most ~10 s, in 5 ms polls
            if core.intake.queued == 0 and not core.has_work():
                break
            await asyncio.sleep(0.005)
        assert core.intake.queued == 0 and not core.has_work()
    finally:
        engine.shutdown()
    assert_idle(core)


# ---- finish reasons --------------------------------------------------------------------------


def test_finish_length_counts_prompt_and_completion(core):
    req = request(PROMPTS[2], "r4-attn", 7)
    got = run(core, {0: [req]})[0]
    assert_consistent(core, req, got, FinishReason.LENGTH)
    assert len(got.tokens) == 7
    assert got.text == core.tokenizer.decode(got.tokens, skip_special_tokens=True)


def _stop_string(text: str) -> str:
    """A 3-character piece of `text` from its second half, first occurring there."""
    for start in range(len(text) // 2, len(text) - 3):
        piece = text[start : start + 3]
        if text.find(piece) == start and piece.strip() and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no stop string in {text!r}")


def test_finish_stop_sequence_ends_before_it(core):
    free = run(core, {0: [request(PROMPTS[0], "r8-all", 24)]})[0]
    stop = _stop_string(free.text)
    cut = free.text.index(stop)
    # The request must end on the first token whose text completes the stop sequence.
    decode = core.tokenizer.decode
    ends_at = next(
        n
        for n in range(1, len(free.tokens) + 1)
        if stop in decode(free.tokens[:n], skip_special_tokens=True)
    )

    req = request(PROMPTS[0], "r8-all", 24, stop=("never-in-output", stop))
    got = run(core, {0: [req]})[0]

    assert_consistent(core, req, got, FinishReason.STOP)
    assert got.tokens == free.tokens[:ends_at]
    assert got.text == free.text[:cut]
    assert stop not in got.text


def test_finish_eos_when_the_model_emits_a_configured_eos(core, model_dirs, tmp_path):
    free = run(core, {0: [request(PROMPTS[3], None, 24)]})[0]
    # Make the token the model emits greedily at some step >= 3 an EOS of a copied model.
    at = next(
        i
        for i in range(3, len(free.tokens))
        if free.tokens[i] not in free.tokens[:i] and not set(free.tokens[: i + 1]) & core.eos_ids
    )
    eos = free.tokens[at]
    directory = shutil.copytree(model_dirs["llama"], tmp_path / "llama-eos")
    path = directory / "generation_config.json"
    generation = json.loads(path.read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], eos]
    path.write_text(json.dumps(generation))
    eos_core = make_core(directory, "none")
    assert eos in eos_core.eos_ids

    req = GenerateRequest(prompt=PROMPTS[3], sampling=SamplingParams(max_new_tokens=24))
    ignoring = replace(req, sampling=replace(req.sampling, ignore_eos=True))
    got, ignored = run(eos_core, {0: [req, ignoring]})

    assert_consistent(eos_core, req, got, FinishReason.EOS)
    assert got.tokens == free.tokens[: at + 1]
    assert got.text == eos_core.tokenizer.decode(free.tokens[:at], skip_special_tokens=True)
    assert_consistent(eos_core, ignoring, ignored, FinishReason.LENGTH)
    assert ignored.tokens == free.tokens
    assert_idle(eos_core)


# ---- the asyncio face ------------------------------------------------------------------------


async def test_async_engine_concurrent_requests_match_each_alone(core):
    adapters = ["r8-all", None, "r64-all", "r1-qv", "r8-rslora", "r32-kv-up"]
    requests = [request(p, a, 8) for p, a in zip(PROMPTS, adapters)]
    alone = [run(core, {0: [r]})[0] for r in requests]

    engine = AsyncEngine(core)

    async def collect(req):
        return [event async for event in await engine.generate(req)]

    try:
        results = await asyncio.wait_for(asyncio.gather(*map(collect, requests)), 60)
    finally:
        engine.shutdown()
    for i, (events, want) in enumerate(zip(results, alone)):
        *tokens, final = events
        assert all(isinstance(e, TokenEvent) for e in tokens), f"request {i}"
        assert [e.token_id for e in tokens] == want.tokens, f"request {i}"
        assert final == FinalEvent(
            FinishReason.LENGTH, want.final.prompt_tokens, 8, "".join(e.text for e in tokens)
        )
        assert final.text == want.text
    assert_idle(core)


# ---- admission control -----------------------------------------------------------------------


def record_admissions(core) -> list[int]:
    """Request ids in the order the scheduler admits them (for the core's lifetime)."""
    order: list[int] = []
    admit = core.scheduler.admit

    def recording():
        admitted, failed = admit()
        order.extend(seq.request_id for seq in admitted)
        return admitted, failed

    core.scheduler.admit = recording
    return order


def test_kv_budget_queues_requests_and_admits_them_in_order(model_dirs):
    # 3 blocks of 8 tokens: A takes 2, B (2) must wait; C (1) would fit but may not jump B.
    core = make_core(
        model_dirs["llama"], "none", kv_cache_tokens=24, kv_block_size=8, max_step_tokens=64
    )
    requests = [
        request([11, 12, 13, 14, 15, 16], None, 10),  # 16 tokens: 2 blocks
        request([21, 22, 23, 24, 25, 26], None, 10),  # 2 blocks
        request([31, 32, 33, 34], None, 4),  # 8 tokens: 1 block
        request([41, 42, 43, 44], None, 4),  # 1 block
    ]
    order = record_admissions(core)
    sinks = [Collected() for _ in requests]
    ids = [core.add_request(r, s) for r, s in zip(requests, sinks)]
    core.step()
    assert (core.num_running, core.num_waiting) == (1, 3)
    peak = 0
    while core.has_work():
        core.step()
        peak = max(peak, core.kv_used_tokens)
        assert core.kv_used_tokens <= 24
        if sinks[0].final is None:
            assert core.num_waiting == 3, "a later request jumped the queue"
    assert peak == 24
    assert order == ids
    for req, got in zip(requests, sinks):
        assert_consistent(core, req, got, FinishReason.LENGTH)
    assert_idle(core)


def test_max_batch_size_caps_the_running_batch(model_dirs):
    core = make_core(model_dirs["llama"], "none", max_batch_size=2, max_step_tokens=64)
    order = record_admissions(core)
    requests = [request(p, None, 3) for p in PROMPTS[:5]]
    sinks = [Collected() for _ in requests]
    ids = [core.add_request(r, s) for r, s in zip(requests, sinks)]
    core.step()
    assert (core.num_running, core.num_waiting) == (2, 3)
    while core.has_work():
        core.step()
        assert core.num_running <= 2
    assert order == ids
    for req, got in zip(requests, sinks):
        assert_consistent(core, req, got, FinishReason.LENGTH)


def test_full_queue_refuses_with_capacity_error(model_dirs, adapter_dirs):
    core = ready_core(model_dirs, adapter_dirs, "none", max_waiting=2)
    sinks = [Collected() for _ in range(3)]
    core.add_request(request(PROMPTS[0], "r4-attn", 3), sinks[0])
    core.add_request(request(PROMPTS[1], "r4-attn", 3), sinks[1])
    with pytest.raises(CapacityError, match=r"queue is full \(2 waiting"):
        core.add_request(request(PROMPTS[2], "r4-attn", 3), sinks[2])
    assert core.num_waiting == 2
    core.step()  # both admitted: the queue has room again
    core.add_request(request(PROMPTS[2], "r4-attn", 3), sinks[2])
    while core.has_work():
        core.step()
    assert all(s.final.finish_reason is FinishReason.LENGTH for s in sinks)
    assert_idle(core)


async def test_async_generate_enforces_max_waiting_while_the_engine_is_busy(model_dirs):
    core = make_core(model_dirs["llama"], "none", max_waiting=2)
    engine = AsyncEngine(core)
    gate = threading.Event()
    engine.call(gate.wait)  # the engine thread is busy (as inside a long step)
    streams = []
    try:
        with pytest.raises(CapacityError, match="queue is full"):
            for prompt in PROMPTS[:4]:
                streams.append(await engine.generate(request(prompt, None, 2)))
    finally:
        gate.set()
        for stream in streams:
            async for _ in stream:
                pass
        engine.shutdown()


def test_step_token_cap_chunks_a_long_prompt_after_the_decodes(core, model_dirs):
    chunked = make_core(model_dirs["llama"], "none", max_batch_size=4, max_step_tokens=8)
    plans = []
    plan = chunked.scheduler.plan

    def recording():
        step_plan = plan()
        plans.append(([n for _, n in step_plan.prefill], len(step_plan.decode)))
        return step_plan

    chunked.scheduler.plan = recording
    long_prompt = list(range(40, 70))  # 30 tokens
    short, long = request([5, 6, 7], None, 10), request(long_prompt, None, 4)
    got = run(chunked, {0: [short], 1: [long]})

    # Step 0 prefills the short prompt; then it decodes one token per step, and the long prompt
    # fills the remaining 7 of 8 tokens per step: 7 + 7 + 7 + 7 + 2.
    assert plans[:6] == [([3], 0), ([7], 1), ([7], 1), ([7], 1), ([7], 1), ([2], 1)]
    reference = run(core, {0: [long]})[0]  # max_step_tokens 2048: one prefill
    assert got[1].tokens == reference.tokens
    for a, b in zip(got[1].logits, reference.logits):
        assert (a - b).abs().max().item() <= LOGIT_TOLERANCE
    for req, result in zip((short, long), got):
        assert_consistent(chunked, req, result, FinishReason.LENGTH)
