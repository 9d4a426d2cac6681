"""Adapter-affinity routing under Ray Serve: which replica each request goes to.

`AdapterAffinityRouter` is the request router of the `LoraServe` deployment (`ray_serve`); every
Ray proxy and deployment handle runs one. A request routed by an adapter (its
`multiplexed_model_id`) goes to the replicas Ray has recorded as holding the adapter or, when
none does, to the adapter's home: the replica that ranks first for the adapter's name by
rendezvous hashing over the running replicas. Every router computes the same home from the same
replicas without waiting for any report, so an adapter's requests land together from the first,
through every proxy; when a replica comes or goes, only the adapters whose home it is move.

A request goes past those replicas, one at a time in the adapter's rendezvous order, only when
they are all known to be full (their queues at `max_ongoing_requests`) or once it has waited
`affinity_wait_s` for them: a hot adapter overflows onto its second replica, which then holds it
and shares its load, and a replica that stops answering costs a request at most that wait.
A request with no adapter goes to the less loaded of two replicas drawn at random, first
among those on the router's own node, as with Ray's default router.

Knows nothing of weights or the engine: adapter names, replicas and their queue lengths.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

AFFINITY_WAIT_S = 2.0


def rendezvous_weight(key: str, replica_id: str) -> bytes:
    """How strongly `key` prefers the replica `replica_id` (highest random weight hashing): the
    replica of highest weight is the key's home, the same in every process."""
    return hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()


class AdapterAffinityRouter(LocalityMixin, RequestRouter):
    """Ray's request router for `LoraServe` (see the module doc)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """`kwargs`: the deployment's `request_router_kwargs` (`affinity_wait_s`)."""
        self._affinity_wait_s = float(kwargs.get("affinity_wait_s", AFFINITY_WAIT_S))

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
        order = sorted(
            candidate_replicas,
            key=lambda replica: rendezvous_weight(adapter, replica.replica_id.unique_id),
            reverse=True,
        )
        preferred = [r for r in order if adapter in r.multiplexed_model_ids] or order[:1]
        waited_s = time.time() - pending_request.created_at
        if waited_s < self._affinity_wait_s and not all(map(self._full, preferred)):
            return [preferred]
        return [preferred, *([r] for r in order if r not in preferred)]

    def _full(self, replica: RunningReplica) -> bool:
        """Whether `replica` last said its queue was full (unknown: not full)."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return queue_len is not None and queue_len >= replica.max_ongoing_requests
