"""Bad adapters and bad requests: each gets its own error type and a message naming the problem,
and the engine goes on serving valid requests exactly as before, with no slot or KV left held."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import ADAPTER_SPECS, write_adapter
from tests.engine.helpers import Collected, make_core, run

from loraserve.engine.async_engine import AsyncEngine
from loraserve.types import (
    MIN_PENALTY,
    MIN_TEMPERATURE,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    FinishReason,
    GenerateRequest,
    InvalidAdapterError,
    InvalidRequestError,
    SamplingParams,
)

GOOD = "r4-attn"  # rank 4, attention only: fits the core's max rank of 8
MAX_RANK = 8
PROMPT = "LoRA adapts a frozen base model"
VALID = GenerateRequest(prompt=PROMPT, adapter="good", sampling=SamplingParams(max_new_tokens=4))
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def served(model_dirs, adapter_dirs):
    """(core, golden tokens of VALID): one registered, resident adapter named "good"."""
    core = make_core(model_dirs["llama"], "none", max_rank=MAX_RANK, device_slots=3)
    key = core.adapters.load("good", adapter_dirs["llama"][GOOD])
    assert core.adapters.prefetch(key)
    assert core.adapters.wait_for_loads(timeout=60)
    golden = run(core, {0: [VALID]})[0]
    assert golden.final.finish_reason is FinishReason.LENGTH
    return core, golden.tokens


def assert_still_serves(core, golden: list[int]) -> None:
    """Nothing queued or held, only "good" resident, and VALID still gives its golden tokens."""
    assert core.num_waiting == core.num_running == core.kv_used_tokens == 0
    stats = core.adapters.stats()
    assert stats.slots_used == 1, "a failed adapter load left a slot occupied"
    assert core.adapters.status(core.adapters.resolve("good")).residency == "device"
    assert len([r for r in core.adapters.slot_ranks if r]) == 1
    assert stats.host_entries == 1
    got = run(core, {0: [VALID]})[0]
    assert got.error is None and got.tokens == golden
    assert core.adapters.stats().references == 0


# ---- broken adapter directories ----------------------------------------------------------------


def rewrite_weights(directory, change) -> None:
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def lora_key(module: str, kind: str) -> str:
    return f"base_model.model.{module}.lora_{kind}.weight"


def poison(*modules):
    def change(tensors):
        for module in modules:
            tensors[lora_key(module, "A")][0, 0] = math.nan

    return change


def rename_module(old: str, new: str):
    def change(tensors):
        for kind in "AB":
            tensors[lora_key(new, kind)] = tensors.pop(lora_key(old, kind))

    return change


def edit_config(**changes):
    def change(directory):
        path = directory / CONFIG
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return change


class _Trap:
    """Unpickling this creates a directory: proof that somebody loaded the pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickle_only(directory) -> None:
    (directory / WEIGHTS).unlink()
    marker = str(directory.parent / "unpickled")
    (directory / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Trap(marker)}))


BROKEN = {
    # name: (adapter to copy, change to its directory, error type, substrings of the message)
    "module-the-base-lacks": (
        GOOD,
        lambda d: rewrite_weights(d, rename_module(Q0, "model.layers.0.self_attn.qq_proj")),
        AdapterIncompatibleError,
        ["model.layers.0.self_attn.qq_proj", "no LoRA-targetable module"],
    ),
    "rank-above-max-rank": (
        "r16-mlp",
        lambda d: None,
        AdapterIncompatibleError,
        ["rank 16", "max rank 8", "model.layers.0.mlp.up_proj"],
    ),
    "pickle-only": (
        GOOD,
        pickle_only,
        InvalidAdapterError,
        [WEIGHTS, "is missing", "adapter_model.bin", "pickle", "safetensors.torch.save_file"],
    ),
    "not-lora": (GOOD, edit_config(peft_type="IA3"), InvalidAdapterError, ["'IA3'", "LoRA"]),
    "dora-without-magnitudes": (
        GOOD,
        edit_config(use_dora=True),
        InvalidAdapterError,
        [Q0, "use_dora is set, but it has no lora_magnitude_vector"],
    ),
    "modules-to-save": (
        GOOD,
        edit_config(modules_to_save=["lm_head"]),
        InvalidAdapterError,
        ["modules_to_save", "full copies of base modules"],
    ),
    "config-problems-together": (
        GOOD,
        edit_config(modules_to_save=["lm_head"], use_qalora=True, r=0),
        InvalidAdapterError,
        ["modules_to_save", "QA-LoRA", "r: must be a whole number"],
    ),
    "trained-bias-on-a-module-without-bias": (
        GOOD,
        lambda d: (
            edit_config(bias="lora_only")(d),
            rewrite_weights(
                d,
                lambda t: t.update({f"base_model.model.{Q0}.base_layer.bias": torch.zeros(128)}),
            ),
        ),
        AdapterIncompatibleError,
        ["does not fit this base model", Q0, "trained bias, but the base module has none"],
    ),
    "lora-bias-without-config": (
        GOOD,
        lambda d: rewrite_weights(
            d, lambda t: t.update({f"base_model.model.{Q0}.lora_B.bias": torch.zeros(128)})
        ),
        InvalidAdapterError,
        [Q0, "has a lora_B bias, but lora_bias is false"],
    ),
    "missing-config": (
        GOOD,
        lambda d: (d / CONFIG).unlink(),
        InvalidAdapterError,
        [f"{CONFIG} is missing"],
    ),
    "invalid-json": (
        GOOD,
        lambda d: (d / CONFIG).write_text('{"r": 4,'),
        InvalidAdapterError,
        [CONFIG, "not valid JSON"],
    ),
    "nan-weights": (
        GOOD,
        lambda d: rewrite_weights(d, poison(Q0)),
        InvalidAdapterError,
        [Q0, "NaN"],
    ),
    "two-broken-modules": (
        GOOD,
        lambda d: rewrite_weights(d, poison(Q0, V1)),
        InvalidAdapterError,
        [Q0, V1, "NaN"],
    ),
    "broken-and-incompatible-together": (
        GOOD,
        lambda d: rewrite_weights(
            d,
            lambda t: (poison(V1)(t), rename_module(Q0, "model.layers.0.self_attn.qq_proj")(t)),
        ),
        InvalidAdapterError,
        [V1, "NaN", "qq_proj", "no LoRA-targetable module"],
    ),
    "missing-lora-b": (
        GOOD,
        lambda d: rewrite_weights(d, lambda t: t.pop(lora_key(Q0, "B"))),
        InvalidAdapterError,
        [Q0, "needs both lora_A and lora_B"],
    ),
    "not-a-lora-tensor": (
        GOOD,
        lambda d: rewrite_weights(
            d, lambda t: t.update({"lm_head.weight": t[lora_key(Q0, "A")].clone()})
        ),
        InvalidAdapterError,
        ["'lm_head.weight'", "not a LoRA A/B weight"],
    ),
    "truncated-weights": (
        GOOD,
        lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:100]),
        InvalidAdapterError,
        ["header claims", "of a 100 byte file"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_is_refused_naming_every_problem(case, served, adapter_dirs, tmp_path):
    core, golden = served
    source, change, error, words = BROKEN[case]
    directory = shutil.copytree(adapter_dirs["llama"][source], tmp_path / "adapter" / case)
    change(directory)

    with pytest.raises(error) as excinfo:
        core.adapters.load("broken", directory)
    assert type(excinfo.value) is error
    for word in words:
        assert word in str(excinfo.value), f"{word!r} not in {excinfo.value}"
    assert not (tmp_path / "adapter" / "unpickled").exists()
    with pytest.raises(AdapterNotFoundError):
        core.adapters.resolve("broken")
    assert_still_serves(core, golden)


def test_two_broken_modules_are_both_listed(served, adapter_dirs, tmp_path):
    core, _ = served
    directory = shutil.copytree(adapter_dirs["llama"][GOOD], tmp_path / "two")
    rewrite_weights(directory, poison(Q0, V1))
    with pytest.raises(InvalidAdapterError) as excinfo:
        core.adapters.load("broken", directory)
    assert len(excinfo.value.problems) == 2
    assert [p.split(":")[0] for p in excinfo.value.problems] == sorted([Q0, V1])


@pytest.fixture(scope="module")
def narrow_adapter(tmp_path_factory):
    """A valid PEFT adapter for a llama of hidden size 64 (the served one has 128)."""
    from loraserve.model.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("narrow")
    base = write_tiny_model(root / "llama64", hidden_size=64, intermediate_size=128)
    spec = next(s for s in ADAPTER_SPECS if s.name == GOOD)
    return write_adapter(base, root / "adapter", spec, seed=5)


def test_adapter_for_another_hidden_size_is_incompatible(served, narrow_adapter):
    core, golden = served
    with pytest.raises(AdapterIncompatibleError) as excinfo:
        core.adapters.load("narrow", narrow_adapter)
    assert type(excinfo.value) is AdapterIncompatibleError
    message = str(excinfo.value)
    assert f"{Q0}: adapter is [in=64, out=64], base module is [in=128, out=128]" in message
    assert len(excinfo.value.problems) == 8  # q, k, v, o of both layers
    assert_still_serves(core, golden)


def test_missing_directory_is_refused(served, tmp_path):
    core, golden = served
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        core.adapters.load("broken", tmp_path / "absent")
    assert_still_serves(core, golden)


def test_failed_reload_keeps_the_adapter_already_served(served, adapter_dirs, tmp_path):
    core, golden = served
    key = core.adapters.resolve("good")
    directory = shutil.copytree(adapter_dirs["llama"][GOOD], tmp_path / "bad-good")
    rewrite_weights(directory, poison(Q0))
    with pytest.raises(InvalidAdapterError):
        core.adapters.load("good", directory)
    assert core.adapters.resolve("good") == key
    assert_still_serves(core, golden)


# ---- bad requests ----------------------------------------------------------------------------


def sampling(**values) -> GenerateRequest:
    return GenerateRequest(prompt=PROMPT, adapter="good", sampling=SamplingParams(**values))


BAD_REQUESTS = {
    # name: (request, error type, substrings of the message)
    "unknown-adapter": (
        GenerateRequest(prompt=PROMPT, adapter="no-such-adapter"),
        AdapterNotFoundError,
        ["'no-such-adapter'", "not found"],
    ),
    "unknown-version": (
        GenerateRequest(prompt=PROMPT, adapter="good", adapter_version="v9"),
        AdapterNotFoundError,
        ["'good'", "version 'v9'"],
    ),
    "prompt-longer-than-context": (
        GenerateRequest(prompt_token_ids=(7,) * 600, sampling=SamplingParams(max_new_tokens=1)),
        InvalidRequestError,
        ["prompt (600 tokens)", "context limit of 512"],
    ),
    "prompt-plus-new-tokens-too-long": (
        GenerateRequest(prompt_token_ids=(7,) * 500, sampling=SamplingParams(max_new_tokens=13)),
        InvalidRequestError,
        ["513", "context limit of 512"],
    ),
    "prompt-over-byte-limit": (  # 32 bytes per token of the 512-token context
        GenerateRequest(prompt="x" * 20_000),
        InvalidRequestError,
        ["20000 bytes", "limit of 16384 bytes", "max_prompt_bytes"],
    ),
    "prompt-over-byte-limit-in-fewer-characters": (
        GenerateRequest(prompt="é" * 9_000),
        InvalidRequestError,
        ["18000 bytes", "limit of 16384 bytes"],
    ),
    "empty-prompt": (GenerateRequest(prompt=""), InvalidRequestError, ["prompt is empty"]),
    "empty-token-list": (
        GenerateRequest(prompt_token_ids=()),
        InvalidRequestError,
        ["prompt is empty"],
    ),
    "token-id-too-large": (
        GenerateRequest(prompt_token_ids=(5, 512, 6)),
        InvalidRequestError,
        ["outside the vocabulary [0, 512)", "[512]"],
    ),
    "token-id-negative": (
        GenerateRequest(prompt_token_ids=(-1, 5)),
        InvalidRequestError,
        ["outside the vocabulary", "[-1]"],
    ),
    "prompt-and-ids": (
        GenerateRequest(prompt=PROMPT, prompt_token_ids=(5, 6)),
        InvalidRequestError,
        ["exactly one of prompt"],
    ),
    "neither-prompt-nor-ids": (GenerateRequest(), InvalidRequestError, ["exactly one of prompt"]),
    "temperature-negative": (sampling(temperature=-1.0), InvalidRequestError, ["temperature"]),
    "temperature-nan": (sampling(temperature=math.nan), InvalidRequestError, ["temperature"]),
    "temperature-inf": (sampling(temperature=math.inf), InvalidRequestError, ["temperature"]),
    "top-p-zero": (sampling(top_p=0.0), InvalidRequestError, ["top_p", "(0, 1]"]),
    "top-p-above-one": (sampling(top_p=1.5), InvalidRequestError, ["top_p", "1.5"]),
    "top-p-nan": (sampling(top_p=math.nan), InvalidRequestError, ["top_p"]),
    "top-k-negative": (sampling(top_k=-1), InvalidRequestError, ["top_k", "-1"]),
    "repetition-penalty-zero": (
        sampling(repetition_penalty=0.0),
        InvalidRequestError,
        ["repetition_penalty"],
    ),
    "repetition-penalty-nan": (
        sampling(repetition_penalty=math.nan),
        InvalidRequestError,
        ["repetition_penalty"],
    ),
    "max-new-tokens-zero": (
        sampling(max_new_tokens=0),
        InvalidRequestError,
        ["max_new_tokens", ">= 1"],
    ),
    "empty-stop-string": (sampling(stop=("ok", "")), InvalidRequestError, ["stop sequences"]),
    "seed-negative": (sampling(seed=-1), InvalidRequestError, ["seed", "-1"]),
    "seed-too-large": (sampling(seed=2**63), InvalidRequestError, ["seed"]),
    "several-at-once": (
        sampling(temperature=-1.0, top_p=0.0, max_new_tokens=0),
        InvalidRequestError,
        ["temperature", "top_p", "max_new_tokens"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_naming_the_problem(case, served):
    core, golden = served
    req, error, words = BAD_REQUESTS[case]
    sink = Collected()
    with pytest.raises(error) as excinfo:
        core.add_request(req, sink)
    assert type(excinfo.value) is error
    for word in words:
        assert word in str(excinfo.value), f"{word!r} not in {excinfo.value}"
    assert sink.tokens == [] and sink.final is None
    assert_still_serves(core, golden)


def test_bad_requests_do_not_disturb_a_running_one(served):
    core, golden = served
    sink = Collected()
    core.add_request(VALID, sink)
    core.step()
    for req, error, _ in BAD_REQUESTS.values():
        with pytest.raises(error):
            core.add_request(req, Collected())
        core.step()
    while core.has_work():
        core.step()
    assert sink.error is None and sink.tokens == golden
    assert sink.final.finish_reason is FinishReason.LENGTH
    assert_still_serves(core, golden)


async def test_async_generate_raises_at_once_and_keeps_serving(served):
    core, golden = served
    engine = AsyncEngine(core)
    try:
        for req, error, _ in BAD_REQUESTS.values():
            with pytest.raises(error):
                await engine.generate(req)
        events = [event async for event in await engine.generate(VALID)]
        assert engine.alive
    finally:
        engine.shutdown()
    assert [e.token_id for e in events[:-1]] == golden
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert_still_serves(core, golden)


# Sampling values at the edge of what SamplingParams.validate accepts, on a request whose adapter
# has finite weights (accepted at load) that overflow inside the model: its logits are NaN, or
# overflow once divided by the temperature or penalised. The sampler must fail that request
# alone, whatever its sampling path (greedy argmax, plain or filtered multinomial, penalty).
OVERFLOWING = {
    "greedy": SamplingParams(max_new_tokens=4),
    "min-temperature": SamplingParams(max_new_tokens=4, temperature=MIN_TEMPERATURE, seed=1),
    "min-penalty": SamplingParams(
        max_new_tokens=4, temperature=0.8, repetition_penalty=MIN_PENALTY, seed=2
    ),
    "filtered": SamplingParams(max_new_tokens=4, temperature=1.0, top_k=5, top_p=0.9, seed=3),
}


@pytest.fixture(scope="module")
def loud_adapter(adapter_dirs, tmp_path_factory):
    """GOOD with every weight multiplied by 1e30: finite, but the model's activations are not
    (the delta alone is ~1e60 whatever the summation order)."""
    directory = shutil.copytree(adapter_dirs["llama"][GOOD], tmp_path_factory.mktemp("loud") / "a")
    rewrite_weights(directory, lambda tensors: [t.mul_(1e30) for t in tensors.values()])
    return directory


@pytest.mark.parametrize("case", list(OVERFLOWING))
def test_overflowing_sampling_values_harm_no_other_request(case, served, loud_adapter):
    core, golden = served
    key = core.adapters.load("loud", loud_adapter)
    assert core.adapters.prefetch(key) and core.adapters.wait_for_loads(timeout=60)
    try:
        innocent, culprit, bystander = Collected(), Collected(), Collected()
        core.add_request(VALID, innocent)
        loud = GenerateRequest(prompt="The quick", adapter="loud", sampling=OVERFLOWING[case])
        core.add_request(loud, culprit)
        core.add_request(GenerateRequest(prompt=PROMPT, sampling=OVERFLOWING[case]), bystander)
        core.step()  # all three prefill in one step, so the culprit's row shares their batch
        assert core.num_running == 2, "the culprit should have failed in the first step"
        while core.has_work():
            core.step()
    finally:
        core.adapters.unload("loud")
    assert isinstance(culprit.error, InvalidRequestError), culprit.error
    assert "not finite" in str(culprit.error) and culprit.tokens == []
    assert innocent.error is None, f"an innocent request failed: {innocent.error!r}"
    assert innocent.tokens == golden
    assert bystander.error is None and len(bystander.tokens) == 4
    assert_still_serves(core, golden)
