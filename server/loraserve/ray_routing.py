"""Adapter-affinity routing under Ray Serve: which replica each request goes to.

`AdapterAffinityRouter` is the request router of the `LoraServe` deployment (`ray_serve`); every
Ray proxy and deployment handle runs one. A request routed by an adapter (its
`multiplexed_model_id`) goes to the replicas Ray has recorded as holding the adapter or, when
none does, to the adapter's home: the replica that ranks first for the adapter's name by
rendezvous hashing over the running replicas. Every router computes the same home from the same
replicas without waiting for any report, so an adapter's requests land together from the first,
through every proxy; when a replica comes or goes, only the adapters whose home it is move.

A request also considers the next replica in the adapter's rendezvous order, and goes to the
less busy of the two, when the least busy of its replicas runs `affinity_imbalance` more
requests than the least busy replica of all, or once it has waited `affinity_wait_s` for them;
past those, one replica at a time in that order. When its replicas are only full (their queues
at `max_ongoing_requests`, as last counted), the next replica comes a rank after them, so that
Ray's probe, not a count that ran ahead, decides that they are. So a hot adapter overflows
onto its second replica, which then holds it and shares its load; a skewed mix of adapters does
not leave one replica idle; and a replica that stops answering costs a request at most that
wait.
A request with no adapter goes to the less loaded of two replicas drawn at random, first
among those on the router's own node, as with Ray's default router.

Knows nothing of weights or the engine: adapter names, replicas and their queue lengths.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

AFFINITY_WAIT_S = 2.0
AFFINITY_IMBALANCE = 4


@dataclass(frozen=True)
class Affinity:
    """When an adapter's request may leave its replicas (see the module doc)."""

    wait_s: float = AFFINITY_WAIT_S
    imbalance: int = AFFINITY_IMBALANCE


@dataclass(frozen=True)
class ReplicaView:
    """What ranking needs of one replica, for one adapter."""

    replica_id: str
    holds: bool  # Ray has recorded that it holds the adapter
    queue_len: int | None  # running and queued requests, as last known (None: not known)
    capacity: int  # `max_ongoing_requests`

    @property
    def full(self) -> bool:
        return self.queue_len is not None and self.queue_len >= self.capacity


def rendezvous_weight(key: str, replica_id: str) -> bytes:
    """How strongly `key` prefers the replica `replica_id` (highest random weight hashing): the
    replica of highest weight is the key's home, the same in every process."""
    return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()


def adapter_ranks(
    adapter: str, replicas: list[ReplicaView], waited_s: float, affinity: Affinity
) -> list[list[str]]:
    """Replica ids to try for a request naming `adapter`, in ranks: Ray takes the least busy
    replica with room in the first rank that has one."""
    order = sorted(
        replicas, key=lambda replica: rendezvous_weight(adapter, replica.replica_id), reverse=True
    )
    preferred = [r for r in order if r.holds] or order[:1]
    others = [r for r in order if r not in preferred]
    busiest_allowed = min(_known_len(r) for r in replicas) + affinity.imbalance
    full = all(r.full for r in preferred)
    crowded = min(_known_len(r) for r in preferred) >= busiest_allowed
    waited = waited_s >= affinity.wait_s
    preferred_ids = [r.replica_id for r in preferred]
    rest = [[r.replica_id] for r in others[1:]]
    if not (full or crowded or waited) or not others:
        return [preferred_ids]
    if full and not (crowded or waited):
        # Only full: a rank of their own first. The cached lengths run ahead of the replicas'
        # (Ray counts a request done when its callback runs, which a loaded router runs late),
        # and Ray probes the replicas its cache calls full, so the next replica takes the
        # request only when the probe finds them full too.
        return [preferred_ids, [others[0].replica_id], *rest]
    return [[*preferred_ids, others[0].replica_id], *rest]


def _known_len(replica: ReplicaView) -> int:
    return replica.queue_len or 0


class AdapterAffinityRouter(LocalityMixin, RequestRouter):
    """Ray's request router for `LoraServe` (see the module doc)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """`kwargs`: the deployment's `request_router_kwargs` (`Affinity`'s fields)."""
        self._affinity = Affinity(**kwargs)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in order, in one routing attempt (Ray probes each rank's
        queue lengths and sends the request to the least loaded replica with room)."""
        adapter = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not adapter or pending_request is None:
            nearby = self.apply_locality_routing(pending_request)  # this node's first, once
            pool = [r for r in candidate_replicas if r.replica_id in nearby]
            return [random.sample(pool, min(2, len(pool)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = [
            ReplicaView(
                replica_id=replica_id,
                holds=adapter in replica.multiplexed_model_ids,
                queue_len=self.replica_queue_len_cache.get(replica.replica_id),
                capacity=replica.max_ongoing_requests,
            )
            for replica_id, replica in by_id.items()
        ]
        waited_s = time.time() - pending_request.created_at
        ranks = adapter_ranks(adapter, views, waited_s, self._affinity)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]
