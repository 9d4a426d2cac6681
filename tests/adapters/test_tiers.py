"""The host-RAM tier's byte budget and the device slot table's invariants."""

from __future__ import annotations

import pytest
import torch

from loraserve.adapters.device_slots import SlotState, SlotTable
from loraserve.adapters.host_cache import HostCache
from loraserve.adapters.peft_format import LoraWeights
from loraserve.model.slot_terms import ModuleWeights


def weights(nbytes: int) -> LoraWeights:
    a = torch.zeros(nbytes // 8, dtype=torch.float32)
    b = torch.zeros(nbytes // 8, dtype=torch.float32)
    return LoraWeights({"m": ModuleWeights(a, b)}, rank=1, config={}, dtype=torch.float32)


def test_host_cache_never_exceeds_its_byte_budget_and_evicts_lru():
    cache = HostCache(budget_bytes=1000)
    for i in range(5):
        cache.put(i, weights(400))
        assert cache.resident_bytes <= 1000
    assert list(range(3)) == [i for i in range(3) if i not in cache]
    assert 3 in cache and 4 in cache
    assert cache.counters.evictions == 3
    cache.get(3)  # 3 becomes most recent: 4 is evicted next
    cache.put(5, weights(400))
    assert 3 in cache and 4 not in cache and 5 in cache


def test_host_cache_skips_an_entry_larger_than_the_budget_and_counts_hits():
    cache = HostCache(budget_bytes=100)
    cache.put("big", weights(800))
    assert "big" not in cache and cache.resident_bytes == 0
    assert cache.get("big") is None
    cache.put("small", weights(80))
    assert cache.get("small") is not None
    assert (cache.counters.hits, cache.counters.misses) == (1, 1)
    cache.discard("small")
    assert cache.resident_bytes == 0


def ready(table: SlotTable, key) -> int:
    slot, needs_load = table.reserve(key)
    assert needs_load
    slot.state = SlotState.READY
    return slot.index


def test_slot_table_reuses_resident_slots_and_evicts_only_idle_lru():
    table = SlotTable(2)
    a, b = ready(table, "a"), ready(table, "b")
    assert table.reserve("c") == (None, False)  # both in use
    table.release(table.slot(a))
    slot, _ = table.reserve("b")  # a hit: same slot, one more reference
    assert slot.index == b and slot.refs == 2
    slot, needs_load = table.reserve("c")  # evicts idle "a", never busy "b"
    assert needs_load and slot.index == a and table.find("a") is None
    assert table.evictions == 1


def test_pinned_slots_are_never_evicted():
    table = SlotTable(1)
    index = ready(table, "hot")
    table.slot(index).pinned = True
    table.release(table.slot(index))
    assert table.reserve("cold") == (None, False)
    table.slot(index).pinned = False
    assert table.reserve("cold")[0].index == index


def test_forgotten_adapter_is_never_handed_out_and_cleared_on_last_release():
    table = SlotTable(1)
    index = ready(table, "v1")
    assert table.forget("v1") is None  # in use: cleared later
    slot = table.slot(index)
    assert slot.forgotten and table.find("v1") is None
    assert table.reserve("v1")[0] is None  # no free slot: the old one is still in use
    assert table.release(slot) is True
    assert slot.key is None and slot.state is SlotState.EMPTY
    fresh, needs_load = table.reserve("v1")
    assert needs_load and fresh.refs == 1


def test_draining_stops_new_reservations_until_a_waiter_takes_the_slot():
    table = SlotTable(1)
    index = ready(table, "hot")
    drained = table.drain_one()
    assert drained.index == index
    assert table.reserve("hot") == (None, False)  # busy and draining: hot requests wait
    table.release(table.slot(index))
    slot, needs_load = table.reserve("cold")  # the waiter gets it first
    assert needs_load and slot.index == index and not slot.draining


def test_release_below_zero_is_a_bug():
    table = SlotTable(1)
    index = ready(table, "a")
    table.release(table.slot(index))
    with pytest.raises(RuntimeError, match="released more often than reserved"):
        table.release(table.slot(index))
    assert table.slot(index).refs == 0
