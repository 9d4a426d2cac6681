"""The adapter manager's seams, with fake LoRA layers and real PEFT files on disk: one
`acquire` protocol, failure memory, load once (`keep_in_host`), names resolved from memory."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loraserve.adapters.keys import AdapterKey, Source, local_key, store_key
from loraserve.adapters.manager import BASE_SLOT, AdapterManager, Admission, Grant
from loraserve.adapters.manifest import AdapterRef
from loraserve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter
from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.types import AdapterNotFoundError, InvalidAdapterError

IN, OUT, MAX_RANK = 8, 6, 4
MODULE = "layers.0.proj"


class FakeLayer(nn.Module):
    """What the manager uses of a MultiLoraLinear: its shapes, slot buffers and `resolve`."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.in_features, self.out_features = IN, OUT
        self.register_buffer("lora_a", torch.zeros(slots, MAX_RANK, IN))
        self.register_buffer("lora_b", torch.zeros(slots, MAX_RANK, OUT))

    @property
    def slot_nbytes(self) -> int:
        return self.lora_a[0].nbytes + self.lora_b[0].nbytes

    def resolve(self, weights):  # plain LoRA: nothing to compute against a base
        return weights

    def set_slot(
        self, slot: int, a, b, scale=None, shift=None, copies=None, lora_scale=1.0,
        stored_half=None, unscaled=False,
    ):  # fmt: skip
        # copies run now; the scaling folded into b (slots in the compute dtype, as stored or
        # not)
        self.clear_slot(slot)
        self.lora_a[slot, : a.shape[0]] = a
        self.lora_b[slot, : b.shape[0]] = b * lora_scale if unscaled else b

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()


def write_peft(directory: Path, rank: int = 2, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    prefix = f"base_model.model.{MODULE}"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(rank, IN, generator=gen),
        f"{prefix}.lora_B.weight": torch.randn(OUT, rank, generator=gen),
    }
    save_file(tensors, directory / WEIGHTS_FILE)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"]}
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return directory


def make_manager(slots: int = 2, host_bytes: int = 1 << 20, **kwargs) -> AdapterManager:
    layers = {MODULE: FakeLayer(slots + 1)}
    return AdapterManager(
        layers, slots, MAX_RANK, torch.float32, torch.device("cpu"), host_bytes, **kwargs
    )


def acquire_ready(manager: AdapterManager, key: AdapterKey) -> Grant:
    grant = manager.acquire(key)
    assert manager.wait_for_loads(30)
    return manager.acquire(key, grant.slot)


def test_the_base_model_is_always_ready_in_slot_zero():
    assert make_manager().acquire(None) == Grant(Admission.READY, BASE_SLOT)


def test_a_cold_adapter_waits_on_its_slot_then_is_ready(tmp_path):
    done = threading.Event()
    manager = make_manager(on_load_done=done.set)
    key = manager.load("a", write_peft(tmp_path / "a", rank=3))
    grant = manager.acquire(key)
    assert grant.admission is not Admission.FAILED and grant.slot == 1
    assert manager.wait_for_loads(30) and done.wait(30)  # the collaborator was called
    again = manager.acquire(key, grant.slot)
    assert again == Grant(Admission.READY, 1)  # the reference carried over: still one
    assert manager.stats().references == 1 and manager.slot_ranks == [0, 3, 0]
    manager.release(again.slot)
    assert manager.stats().references == 0
    assert manager.acquire(key) == Grant(Admission.READY, 1)  # still resident: a hit
    stats = manager.stats()
    assert (stats.device.hits, stats.device.misses, stats.slots_used) == (1, 1, 1)
    assert manager.status(key).residency == "device"


def test_no_free_slot_means_waiting_without_a_reference(tmp_path):
    manager = make_manager(slots=1)
    held = acquire_ready(manager, manager.load("a", write_peft(tmp_path / "a")))
    other = manager.load("b", write_peft(tmp_path / "b", seed=1))
    assert manager.acquire(other) == Grant(Admission.WAITING)
    assert manager.stats().references == 1
    manager.release(held.slot)
    assert acquire_ready(manager, other) == Grant(Admission.READY, 1)


def test_a_failed_load_fails_releases_and_is_remembered(tmp_path):
    manager = make_manager(host_bytes=1)  # no host tier: every load reads the disk
    directory = write_peft(tmp_path / "a")
    key = manager.load("a", directory)
    (directory / WEIGHTS_FILE).write_bytes(b"\0" * 64)
    failed = acquire_ready(manager, key)
    assert failed.admission is Admission.FAILED and failed.slot is None
    assert isinstance(failed.error, InvalidAdapterError)
    assert manager.stats().references == 0 and manager.stats().load_failures == 1
    again = manager.acquire(key)  # remembered: no new load
    assert again.admission is Admission.FAILED and again.error is failed.error
    assert manager.stats().load_failures == 1
    with pytest.raises(InvalidAdapterError):
        manager.prefetch(key)
    write_peft(tmp_path / "fixed")
    (directory / WEIGHTS_FILE).write_bytes((tmp_path / "fixed" / WEIGHTS_FILE).read_bytes())
    manager.failure_ttl_s = 0.0  # the memory expires: the next request tries again
    assert acquire_ready(manager, key).admission is Admission.READY


def test_weights_kept_in_host_serve_without_any_disk_read(tmp_path):
    """Load once: what a publish validated serves as is (this key has no files anywhere)."""
    manager = make_manager()
    directory = write_peft(tmp_path / "a")
    weights = read_peft_adapter(directory, manager.targets, MAX_RANK, torch.float32)
    key = AdapterKey(Source.STORE, "acme/a@1", "0" * 64)
    with pytest.raises(ValueError, match="dtype"):
        manager.keep_in_host(key, read_peft_adapter(directory, manager.targets, 4, torch.half))
    manager.keep_in_host(key, weights)
    assert manager.status(key).residency == "host"
    assert acquire_ready(manager, key) == Grant(Admission.READY, 1)
    assert manager.stats().host.misses == 0 and manager.stats().load_failures == 0


def test_pin_and_forget(tmp_path):
    manager = make_manager(slots=1)
    key = manager.load("a", write_peft(tmp_path / "a"))
    assert manager.pin(key, True) and manager.status(key).pinned
    assert manager.wait_for_loads(30)
    other = manager.load("b", write_peft(tmp_path / "b", seed=1))
    assert manager.acquire(other) == Grant(Admission.WAITING)  # the only slot is pinned
    assert manager.pin(key, False) is False and not manager.status(key).pinned
    manager.forget(key)
    assert manager.status(key).residency == "disk" and manager.stats().slots_used == 0


def refuse_disk(*args, **kwargs):
    pytest.fail("resolving a name read more of the disk than one lstat")


def test_names_resolve_from_memory_and_replacing_makes_a_new_key(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    manager = make_manager(store=store)
    first = write_peft(tmp_path / "v1")
    key = manager.load("sql", first)
    assert key == local_key("sql", first) and key.name == "sql" and key.source is Source.LOCAL
    publisher = AdapterPublisher(store, "fingerprint", manager.targets, MAX_RANK)
    stored = store_key(publisher.publish_dir("acme", "sql", write_peft(tmp_path / "mine")))
    lstat, checked = os.lstat, []

    def counted(path, *args, **kwargs):
        checked.append(str(path))
        return lstat(path, *args, **kwargs)

    with monkeypatch.context() as from_memory:  # and one lstat: is that version still there?
        for call in ("stat", "open", "scandir", "listdir"):
            from_memory.setattr(os, call, refuse_disk)
        from_memory.setattr(os, "lstat", counted)
        assert manager.resolve("sql", tenant="acme") == stored  # the tenant's own first
        assert manager.resolve("sql", tenant="acme", version="1") == stored
        assert manager.resolve("sql", tenant="beta") == key  # then the shared one
        assert manager.resolve(None) is None and manager.resolve("") is None
    assert len(checked) == 3, checked
    with pytest.raises(AdapterNotFoundError, match="version '2'"):
        manager.resolve("sql", tenant="acme", version="2")
    assert manager.load("sql", first) == key  # the same files: the same key
    replaced = manager.load("sql", write_peft(tmp_path / "v2", seed=1))
    assert replaced != key and manager.resolve("sql") == replaced
    assert manager.status(key).residency == "disk"  # forgotten: out of the host tier
    manager.unload("sql")
    with pytest.raises(AdapterNotFoundError):
        manager.resolve("sql")


def test_a_stored_key_names_its_adapter_without_tenant_or_version():
    key = AdapterKey(Source.STORE, str(AdapterRef("acme", "sql", "7")), "a" * 64)
    assert key.name == "sql" and AdapterRef.parse(key.reference) == AdapterRef("acme", "sql", "7")


def test_a_directory_rewritten_in_place_after_load_serves_what_was_validated(tmp_path):
    """The host tier owns its tensors: overwriting the file a tensor was read from (PEFT's
    save_pretrained truncates it) must not crash the process with SIGBUS on the next load."""
    layer = FakeLayer(3)
    cpu = torch.device("cpu")
    manager = AdapterManager({MODULE: layer}, 2, MAX_RANK, torch.float32, cpu, 1 << 20)
    directory = write_peft(tmp_path / "a")
    key = manager.load("a", directory)
    (directory / WEIGHTS_FILE).write_bytes(b"\0" * 64)
    assert acquire_ready(manager, key) == Grant(Admission.READY, 1)
    assert layer.lora_a[1].abs().sum() > 0
