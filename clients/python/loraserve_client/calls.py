"""What every call carries, and how idempotent calls are retried.

Each call sends `authorization: Bearer <api key>` metadata when the client has a key, and has a
deadline: the per-call timeout or the client's default, covering all of its attempts. Only
UNAVAILABLE is retried, with capped exponential backoff and full jitter, and only as many times
as the caller allows (the clients allow none for generate, upload and delete). Knows nothing
about which RPC is made or its messages.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class Backoff:
    """The wait before retry n (from 0): uniform in [0, min(maximum, initial * multiplier**n)]."""

    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        return random.uniform(0.0, min(self.maximum, self.initial * self.multiplier**retry))


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class CallSettings:
    api_key: str | None
    # Seconds a call may take when the caller gives no timeout.
    timeout: float
    # Retries after the first attempt, for idempotent calls.
    retries: int
    backoff: Backoff

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def seconds(self, timeout: float | None) -> float:
        """The call's own timeout, else the client's."""
        return self.timeout if timeout is None else timeout

    def deadline(self, timeout: float | None) -> float:
        """The monotonic time by which the call, every attempt included, must end."""
        return time.monotonic() + self.seconds(timeout)


def remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _retry_delay(
    error: grpc.RpcError, retry: int, retries: int, backoff: Backoff, deadline: float
) -> float | None:
    """How long to wait before retrying after `error`, or None to give up."""
    if error.code() not in RETRYABLE or retry >= retries:
        return None
    delay = backoff.delay(retry)
    return delay if time.monotonic() + delay < deadline else None


def retrying(
    attempt: Callable[[float], T],
    retries: int,
    backoff: Backoff,
    deadline: float,
    sleep: Callable[[float], object],
) -> T:
    """`attempt(seconds left)` until it succeeds or may not be retried; raises the last error."""
    retry = 0
    while True:
        try:
            return attempt(remaining(deadline))
        except grpc.RpcError as error:
            delay = _retry_delay(error, retry, retries, backoff, deadline)
            if delay is None:
                raise
        sleep(delay)
        retry += 1


async def retrying_async(
    attempt: Callable[[float], Awaitable[T]],
    retries: int,
    backoff: Backoff,
    deadline: float,
    sleep: Callable[[float], Awaitable[object]],
) -> T:
    """The grpc.aio twin of `retrying`."""
    retry = 0
    while True:
        try:
            return await attempt(remaining(deadline))
        except grpc.RpcError as error:
            delay = _retry_delay(error, retry, retries, backoff, deadline)
            if delay is None:
                raise
        await sleep(delay)
        retry += 1
