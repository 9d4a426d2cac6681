"""How `ray_routing` ranks replicas for an adapter: every adapter has one home among the
replicas, adapters spread evenly over them, a replica coming or going moves only the adapters
whose home it is, and a request leaves its adapter's replicas only when they are full, much
busier than another, or silent past the wait (the router in a Ray cluster: test_ray_serve.py)."""

from __future__ import annotations

from collections import Counter

import pytest

ray_routing = pytest.importorskip("loraserve.ray_routing")
rendezvous_weight = ray_routing.rendezvous_weight
Affinity, ReplicaView, adapter_ranks = (
    ray_routing.Affinity, ray_routing.ReplicaView, ray_routing.adapter_ranks
)  # fmt: skip

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


def views(queues: dict[str, int | None], holders: tuple[str, ...] = ()) -> list:
    return [
        ReplicaView(replica_id=r, holds=r in holders, queue_len=q, capacity=8)
        for r, q in queues.items()
    ]


def by_rank(adapter: str, replicas: list[str]) -> list[str]:
    """`replicas` in `adapter`'s rendezvous order."""
    return sorted(replicas, key=lambda r: rendezvous_weight(adapter, r), reverse=True)


IDLE = {"r0": 0, "r1": 0, "r2": 0}
AFFINITY = Affinity(wait_s=2.0, imbalance=4)


def test_a_request_goes_to_its_adapter_s_home_or_the_replicas_that_hold_it():
    first, second, third = by_rank("sql", list(IDLE))
    assert adapter_ranks("sql", views(IDLE), 0.0, AFFINITY) == [[first]]
    unknown = dict.fromkeys(IDLE)  # no queue lengths known yet: still the home
    assert adapter_ranks("sql", views(unknown), 0.0, AFFINITY) == [[first]]
    held = adapter_ranks("sql", views(IDLE, holders=(third, second)), 0.0, AFFINITY)
    assert held == [[second, third]]  # in rendezvous order; Ray takes the less busy


def test_a_full_home_shares_with_the_next_replica_then_the_rest():
    first, second, third = by_rank("sql", list(IDLE))
    queues = {**IDLE, first: 8}  # full, and 8 >= 0 + 4: crowded as well
    assert adapter_ranks("sql", views(queues), 0.0, AFFINITY) == [[first, second], [third]]
    both_full = {**IDLE, first: 8, second: 8}
    held = views(both_full, holders=(first, second))
    assert adapter_ranks("sql", held, 0.0, AFFINITY) == [[first, second, third]]


def test_a_home_only_the_cache_calls_full_is_tried_before_the_next_replica():
    """Full but not much busier than the rest (a cached length that ran ahead of the replica's,
    as a loaded router's late completions leave it): the home is a rank of its own, which Ray
    probes, and the next replica a rank after it."""
    first, second, third = by_rank("sql", list(IDLE))
    lenient = Affinity(wait_s=2.0, imbalance=9)  # 8 < 0 + 9
    queues = {**IDLE, first: 8}
    assert adapter_ranks("sql", views(queues), 0.0, lenient) == [[first], [second], [third]]
    held = views({**IDLE, first: 8, second: 8}, holders=(first, second))
    assert adapter_ranks("sql", held, 0.0, lenient) == [[first, second], [third]]
    assert adapter_ranks("sql", views(queues), 2.0, lenient) == [[first, second], [third]]


def test_a_much_busier_home_shares_with_the_next_replica():
    first, second, third = by_rank("sql", list(IDLE))
    assert adapter_ranks("sql", views({**IDLE, first: 3}), 0.0, AFFINITY) == [[first]]
    busy = {first: 5, second: 3, third: 1}  # 5 >= 1 + 4: a replica runs far fewer
    assert adapter_ranks("sql", views(busy), 0.0, AFFINITY) == [[first, second], [third]]
    lenient = Affinity(wait_s=2.0, imbalance=5)
    assert adapter_ranks("sql", views(busy), 0.0, lenient) == [[first]]


def test_a_request_that_waited_past_the_wait_may_leave():
    first, second, third = by_rank("sql", list(IDLE))
    assert adapter_ranks("sql", views(IDLE), 1.9, AFFINITY) == [[first]]
    assert adapter_ranks("sql", views(IDLE), 2.0, AFFINITY) == [[first, second], [third]]


def test_one_replica_is_always_the_one():
    alone = {"r0": 8}
    assert adapter_ranks("sql", views(alone), 60.0, AFFINITY) == [["r0"]]
