"""Many more adapters than device slots, with replacements and deletes mid-traffic.

Every output must equal that adapter's output when run alone: zero cross-adapter mix-ups,
whatever was evicted, replaced or deleted in between.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.engine.helpers import Collected, make_core, run

from loraserve.types import AdapterNotFoundError, CapacityError, GenerateRequest, SamplingParams

NUM_ADAPTERS, SLOTS, REQUESTS, MAX_NEW = 40, 4, 240, 4
PROMPTS = ("The quick brown fox", "LoRA adapts", "Café 🙂 naïve")


def write_random_adapter(directory: Path, targets: dict, seed: int, rank: int = 4) -> Path:
    """A PEFT-format LoRA on q_proj and v_proj with random weights strong enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in targets.items():
        if module.endswith(("q_proj", "v_proj")):
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.2
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.2
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def request(prompt: str, adapter: str | None) -> GenerateRequest:
    return GenerateRequest(
        prompt=prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=MAX_NEW)
    )


@pytest.mark.slow
def test_churn_with_more_adapters_than_slots_never_mixes_weights(model_dirs, tmp_path):
    reference = make_core(model_dirs["llama"], device_slots=SLOTS, max_batch_size=32)
    directories = {
        f"a{i}": write_random_adapter(tmp_path / f"a{i}", reference.adapters.targets, seed=i)
        for i in range(NUM_ADAPTERS)
    }
    replacement = write_random_adapter(tmp_path / "a5-v2", reference.adapters.targets, seed=999)

    def alone(directory: Path | None, prompt: str) -> list[int]:
        name = None
        if directory is not None:
            name = "solo"
            reference.adapters.load(name, directory)
        return run(reference, {0: [request(prompt, name)]})[0].tokens

    expected = {
        (name, prompt): alone(directory, prompt)
        for name, directory in [*directories.items(), ("a5-v2", replacement), (None, None)]
        for prompt in PROMPTS
    }
    assert len({tuple(v) for v in expected.values()}) > NUM_ADAPTERS  # adapters matter

    # 40 adapters, 4 slots, a small host tier: constant eviction across both tiers.
    one_adapter = reference.adapters.stats().host.resident_bytes
    core = make_core(
        model_dirs["llama"],
        device_slots=SLOTS,
        max_batch_size=32,
        host_cache_bytes=10 * one_adapter,
        slot_patience_steps=4,
    )
    for name, directory in directories.items():
        core.adapters.load(name, directory)
    rng = random.Random(0)
    arrivals: dict[int, list] = {}
    plan = []  # (arrival step, name wanted, expected key name)
    for i in range(REQUESTS):
        step = i // 8
        name = rng.choice([*directories, None])
        prompt = rng.choice(PROMPTS)
        arrivals.setdefault(step, []).append(request(prompt, name))
        plan.append((step, name, prompt))

    # Mid-traffic: replace a5 at step 10 and delete a7 at step 15 (via the engine thread's
    # own calls, between steps, as the API does).
    original_step = core.step
    deleted_at, replaced_at = 15, 10

    def step_with_changes():
        if core.steps == replaced_at:
            core.adapters.load("a5", replacement)
        if core.steps == deleted_at:
            core.adapters.unload("a7")
        return original_step()

    core.step = step_with_changes
    # Requests for a7 after its deletion are refused at submission; earlier ones were resolved
    # before it and finish on its weights.
    gone = [(s, n, p) for s, n, p in plan if n == "a7" and s > deleted_at]
    for step in arrivals:
        if step > deleted_at:
            arrivals[step] = [r for r in arrivals[step] if r.adapter != "a7"]
    results = run(core, arrivals)
    with pytest.raises(AdapterNotFoundError):
        core.make_sequence(request(PROMPTS[0], "a7"), Collected())

    kept = [(s, n, p) for s, n, p in plan if not (n == "a7" and s > deleted_at)]
    assert gone and len(results) == len(kept)
    for (step, name, prompt), got in zip(kept, results):
        want_name = "a5-v2" if name == "a5" and step > replaced_at else name
        assert got.error is None
        assert got.tokens == expected[want_name, prompt], (step, name, prompt)
    assert core.kv_used_tokens == 0
    stats = core.adapters.stats()
    assert stats.references == 0
    assert stats.host.resident_bytes <= 10 * one_adapter
    assert stats.device.evictions > NUM_ADAPTERS


def test_cold_load_does_not_stall_running_sequences(model_dirs, tmp_path, monkeypatch):
    """While a cold adapter's load is blocked, the running sequence decodes to completion."""
    import loraserve.adapters.manager as manager_module

    core = make_core(model_dirs["llama"], device_slots=2, host_cache_bytes=1)  # every load reads
    cold = write_random_adapter(tmp_path / "cold", core.adapters.targets, seed=1)
    release_load = threading.Event()
    real_read = manager_module.read_peft_adapter

    def slow_read(*args, **kwargs):
        assert release_load.wait(60)
        return real_read(*args, **kwargs)

    core.adapters.load("cold", cold)
    monkeypatch.setattr(manager_module, "read_peft_adapter", slow_read)
    running, waiting = Collected(), Collected()
    long = GenerateRequest(prompt="hello", sampling=SamplingParams(max_new_tokens=12))
    core.add_request(long, running)
    core.step()
    core.add_request(request("LoRA adapts", "cold"), waiting)
    while running.final is None:
        core.step()  # every step decodes the running sequence although the load is stuck
    assert len(running.tokens) == 12 and waiting.tokens == []
    release_load.set()
    while waiting.final is None:
        core.step()
        if core.num_running == 0:
            core.adapters.wait_for_loads(60)
    assert len(waiting.tokens) == MAX_NEW


@pytest.mark.slow
def test_a_cold_adapter_is_not_starved_by_a_stream_of_hot_requests(model_dirs, tmp_path):
    core = make_core(model_dirs["llama"], device_slots=1, max_batch_size=4, slot_patience_steps=4)
    for name in ("hot", "cold"):
        core.adapters.load(name, write_random_adapter(tmp_path / name, core.adapters.targets, 7))
    cold = Collected()
    for step in range(400):
        if step < 300:  # a new hot request every step, for much longer than the cold one needs
            core.add_request(request("LoRA adapts", "hot"), Collected())
        if step == 10:
            core.add_request(request("The quick brown fox", "cold"), cold)
        if core.has_work() and not core.step():
            core.adapters.wait_for_loads(60)
        if cold.final is not None:
            break
    assert cold.final is not None and step < 100, f"the cold request waited {step - 10} steps"
    assert len(cold.tokens) == MAX_NEW and cold.error is None


def test_the_queue_is_bounded_in_prompt_tokens_too(model_dirs):
    prompt = "The quick brown fox jumps over the lazy dog."
    probe = make_core(model_dirs["llama"])
    size = len(probe.tokenizer.encode(prompt))
    core = make_core(model_dirs["llama"], max_waiting_tokens=2 * size - 1)
    core.make_sequence(request(prompt, None), Collected())
    with pytest.raises(CapacityError, match="above its bound of"):
        core.make_sequence(request(prompt, None), Collected())


@pytest.mark.slow
def test_churn_with_every_kind_of_adapter_never_mixes_weights(
    model_dirs, adapter_dirs, kind_adapter_dirs
):
    """DoRA (also on the embedding), embedding LoRA and bias adapters with plain LoRA: eight
    adapters over three slots and a host tier that holds three, every output equal to that
    adapter's alone. Qwen2, whose q/k/v biases give the trained-bias kinds something to train."""
    arch = "qwen2"
    directories = dict(kind_adapter_dirs[arch])
    directories.update({n: adapter_dirs[arch][n] for n in ("r1-qv", "r8-all", "r16-mlp")})
    reference = make_core(model_dirs[arch], device_slots=2, max_batch_size=16)
    expected, largest = {}, 0
    for name, directory in [*directories.items(), (None, None)]:
        if directory is not None:
            reference.adapters.load("solo", directory)
            largest = max(largest, reference.adapters.stats().host.resident_bytes)
        for prompt in PROMPTS:
            solo = request(prompt, None if directory is None else "solo")
            expected[name, prompt] = run(reference, {0: [solo]})[0].tokens
    assert len({tuple(v) for v in expected.values()}) > len(directories)  # adapters matter

    core = make_core(
        model_dirs[arch],
        device_slots=3,
        max_batch_size=16,
        host_cache_bytes=3 * largest,
        slot_patience_steps=4,
    )
    for name, directory in directories.items():
        core.adapters.load(name, directory)
    rng = random.Random(1)
    plan = [(rng.choice([*directories, None]), rng.choice(PROMPTS)) for _ in range(64)]
    arrivals: dict[int, list] = {}
    for i, (name, prompt) in enumerate(plan):
        arrivals.setdefault(i // 4, []).append(request(prompt, name))
    results = run(core, arrivals)

    for (name, prompt), got in zip(plan, results):
        assert got.error is None
        assert got.tokens == expected[name, prompt], (name, prompt)
    stats = core.adapters.stats()
    assert stats.references == 0 and core.kv_used_tokens == 0
    assert stats.device.evictions > len(directories) and stats.host.evictions > 0
