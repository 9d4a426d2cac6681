"""A failed adapter load fails only that adapter's requests, and is remembered for a while."""

from __future__ import annotations

import shutil

from tests.engine.helpers import Collected, make_core, run

from loraserve.types import GenerateRequest, InvalidAdapterError, SamplingParams

WEIGHTS = "adapter_model.safetensors"


def request(adapter: str | None, new_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(
        prompt="The quick brown fox",
        adapter=adapter,
        sampling=SamplingParams(max_new_tokens=new_tokens),
    )


def step_until_idle(core) -> None:
    while core.has_work():
        if not core.step():
            assert core.adapters.wait_for_loads(60)


def test_a_broken_adapter_fails_alone_then_fast_then_is_retried(model_dirs, adapter_dirs, tmp_path):
    core = make_core(model_dirs["llama"], device_slots=2, host_cache_bytes=1)  # no host tier
    good_dir = adapter_dirs["llama"]["r8-all"]
    broken_dir = tmp_path / "broken"
    shutil.copytree(adapter_dirs["llama"]["r4-attn"], broken_dir)
    core.adapters.load("good", good_dir)
    broken_key = core.adapters.load("broken", broken_dir)  # valid when registered
    want = run(core, {0: [request("good")]})[0].tokens
    saved = (broken_dir / WEIGHTS).read_bytes()
    (broken_dir / WEIGHTS).write_bytes(b"\x00" * 64)  # the disk copy goes bad

    good, broken = Collected(), Collected()
    core.add_request(request("good", 12), good)
    core.step()
    core.add_request(request("broken"), broken)
    step_until_idle(core)

    assert isinstance(broken.error, InvalidAdapterError) and WEIGHTS in str(broken.error)
    assert broken.tokens == [] and broken.final is None
    assert good.error is None and good.tokens[: len(want)] == want
    failures = core.adapters.stats().load_failures
    assert failures == 1

    refused = Collected()  # remembered: fails at its first step, with no new load
    core.add_request(request("broken"), refused)
    core.step()
    assert isinstance(refused.error, InvalidAdapterError) and refused.tokens == []
    assert core.adapters.stats().load_failures == failures
    assert not core.has_work()

    (broken_dir / WEIGHTS).write_bytes(saved)  # repaired; once the memory expires, it loads
    core.adapters.failure_ttl_s = 0.0
    healed = Collected()
    core.add_request(request("broken"), healed)
    step_until_idle(core)
    assert healed.error is None and len(healed.tokens) == 6
    assert core.adapters.stats().references == 0
    assert core.adapters.status(broken_key).residency == "device"
