"""Calls in flight: in all, so a drain knows when the last one ended, and generation calls per
tenant, for the `max_requests_in_flight` quota.

`CallInterceptor` counts every call but health and reflection from the moment its handler
starts to the moment it returns (a stream: its last message); `CallTracker.wait_idle` wakes
when the count reaches zero. `CallTracker.generation` holds one of a tenant's generation
places for a Generate or GenerateStream call, refusing with CapacityError (RESOURCE_EXHAUSTED,
retry later) when the tenant already has its quota's worth. Everything runs on the event loop,
so plain counters are enough.

Knows nothing about what the methods do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import grpc

from loraserve.api.auth import PUBLIC_PREFIXES
from loraserve.api.handlers import around, behaviour_of, rewrapped
from loraserve.types import CapacityError


class CallTracker:
    def __init__(self) -> None:
        self.calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._generations: Counter[str] = Counter()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Count one call for as long as the block runs."""
        self.calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.calls -= 1
            if self.calls == 0:
                self._idle.set()

    @contextlib.contextmanager
    def generation(self, tenant: str, limit: int | None) -> Iterator[None]:
        """Hold one of `tenant`'s `limit` generation places (None: no limit) for the block."""
        if limit is not None and self._generations[tenant] >= limit:
            raise CapacityError(
                f"tenant {tenant} has {self._generations[tenant]} generation requests in flight, "
                f"its quota (max_requests_in_flight); retry when one of them has finished"
            )
        self._generations[tenant] += 1
        try:
            yield
        finally:
            self._generations[tenant] -= 1
            if not self._generations[tenant]:
                del self._generations[tenant]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


async def _unchanged(request, context):
    return request


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracker: CallTracker) -> None:
        self.tracker = tracker

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        return rewrapped(handler, around(behaviour_of(handler), _unchanged, self.tracker.call))
