"""The rendezvous ranking `ray_routing` routes adapters by: every adapter has one home among the
replicas, adapters spread evenly over them, and a replica coming or going moves only the
adapters whose home it is (the router itself runs in a Ray cluster: test_ray_serve.py)."""

from __future__ import annotations

from collections import Counter

import pytest

rendezvous_weight = pytest.importorskip("loraserve.ray_routing").rendezvous_weight

ADAPTERS = [f"tenant-{i % 7}-adapter-{i}" for i in range(4000)]
REPLICAS = [f"replica{i:02d}" for i in range(8)]


def home(adapter: str, replicas: list[str]) -> str:
    return max(replicas, key=lambda replica: rendezvous_weight(adapter, replica))


def homes(replicas: list[str]) -> dict[str, str]:
    return {adapter: home(adapter, replicas) for adapter in ADAPTERS}


def test_adapters_spread_evenly_over_the_replicas():
    per_replica = Counter(homes(REPLICAS).values())
    assert set(per_replica) == set(REPLICAS)
    even = len(ADAPTERS) / len(REPLICAS)
    assert all(0.85 * even <= count <= 1.15 * even for count in per_replica.values()), per_replica


def test_a_replica_leaving_moves_only_its_own_adapters():
    before = homes(REPLICAS)
    after = homes(REPLICAS[1:])
    moved = {adapter for adapter in ADAPTERS if before[adapter] != after[adapter]}
    assert moved == {adapter for adapter in ADAPTERS if before[adapter] == REPLICAS[0]}


def test_a_replica_joining_takes_only_adapters_that_move_to_it():
    before = homes(REPLICAS)
    after = homes([*REPLICAS, "replica-new"])
    moved = {adapter for adapter in ADAPTERS if before[adapter] != after[adapter]}
    assert moved == {adapter for adapter in ADAPTERS if after[adapter] == "replica-new"}
    assert 0.5 * len(ADAPTERS) / 9 <= len(moved) <= 1.5 * len(ADAPTERS) / 9


def test_the_ranking_is_the_same_in_every_process():
    """A fixed hash of the names, not Python's per-process salted `hash`: every Ray proxy and
    handle computes the same homes."""
    assert rendezvous_weight("sql", "abc123").hex() == "d2815e204fa79d8a"
