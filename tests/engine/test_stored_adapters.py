"""A tenant's published adapter in the engine: resolved from memory at submission, served from
the weights its publish validated (load once), named in the gateway gauge by its name alone."""

from __future__ import annotations

import os

import pytest
from tests.engine.helpers import Collected, make_core, run

from loraserve.adapters.keys import store_key
from loraserve.adapters.peft_format import WEIGHTS_FILE
from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.types import GenerateRequest, SamplingParams

ADAPTER = "r8-all"


def request(adapter: str | None, tenant: str | None = "acme") -> GenerateRequest:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    return GenerateRequest(prompt="LoRA adapts", adapter=adapter, tenant=tenant, sampling=params)


@pytest.fixture
def published(model_dirs, adapter_dirs, tmp_path):
    """(core, store, manifest): acme/sql@1 published through a publisher wired as the server
    wires it, and the same files registered locally as "local" for the expected tokens."""
    store = AdapterStore(tmp_path / "store")
    core = make_core(model_dirs["llama"], "none", store=store, device_slots=2)
    manager = core.adapters
    publisher = AdapterPublisher(
        store, "fingerprint", manager.targets, 64, manager.dtype, manager.keep_in_host
    )
    manifest = publisher.publish_dir("acme", "sql", adapter_dirs["llama"][ADAPTER])
    manager.load("local", adapter_dirs["llama"][ADAPTER])
    return core, store, manifest


def test_a_published_version_serves_from_what_its_publish_validated(published):
    core, store, manifest = published
    want = run(core, {0: [request("local")]})[0].tokens
    weights = store.path(manifest.ref) / WEIGHTS_FILE
    weights.chmod(0o644)
    weights.write_bytes(b"\0" * 64)  # a first read from disk would now fail
    got = run(core, {0: [request("sql")]})[0]
    assert got.error is None and got.tokens == want
    stats = core.adapters.stats()
    assert stats.host.misses == 0 and stats.load_failures == 0


def test_submission_resolves_from_memory_and_the_gauge_names_the_adapter(published, monkeypatch):
    core, _, manifest = published

    def refuse(*args, **kwargs):
        pytest.fail("submitting a request read more of the disk than one lstat")

    lstat, checked = os.lstat, []

    def counted(path, *args, **kwargs):
        checked.append(path)
        return lstat(path, *args, **kwargs)

    with monkeypatch.context() as from_memory:  # and one lstat: is that version still there?
        for call in ("stat", "open", "scandir", "listdir"):
            from_memory.setattr(os, call, refuse)
        from_memory.setattr(os, "lstat", counted)
        seq = core.make_sequence(request("sql"), Collected())
    assert len(checked) == 1
    assert seq.adapter_key == store_key(manifest)
    core.add(seq)
    core.add(core.make_sequence(request("local", tenant=None), Collected()))
    assert core.live_state().waiting_adapters == ("local", "sql")
    while core.has_work():
        if not core.step():
            assert core.adapters.wait_for_loads(60)
    assert core.live_state().waiting_adapters == core.live_state().running_adapters == ()
