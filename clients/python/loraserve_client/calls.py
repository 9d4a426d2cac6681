"""What every call carries, and which calls gRPC retries.

Each call sends `authorization: Bearer <api key>` metadata when the client has a key, and has a
deadline: the per-call timeout or the client's default, covering all of its attempts. Retries
are gRPC's own, from the channel's service config (`retryPolicy`): only UNAVAILABLE, only for
the idempotent methods (health, server info, list and get adapters), with capped exponential
backoff and jitter, at most `retries` times (gRPC allows 4), and a server's
`grpc-retry-pushback-ms` trailer obeyed. Generate, upload, delete, prefetch and pin are never
retried. Knows nothing about messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# (service, method) of the calls that may be repeated without changing anything.
IDEMPOTENT = (
    ("grpc.health.v1.Health", "Check"),
    ("loraserve.v1.ServerService", "GetServerInfo"),
    ("loraserve.v1.AdapterService", "ListAdapters"),
    ("loraserve.v1.AdapterService", "GetAdapter"),
)
MAX_ATTEMPTS = 5  # gRPC's cap on attempts, the first included
RETRYABLE_CODES = ("UNAVAILABLE",)


@dataclass(frozen=True)
class Backoff:
    """The wait before retry n (from 0): gRPC draws it uniformly in
    [0, min(maximum, initial * multiplier**n)] seconds."""

    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0


DEFAULT_BACKOFF = Backoff()


def service_config(retries: int, backoff: Backoff) -> str:
    """The channel's service config: the retry policy of the idempotent methods (none when
    `retries` is 0)."""
    if retries < 1:
        return json.dumps({})
    policy = {
        "maxAttempts": min(retries + 1, MAX_ATTEMPTS),
        "initialBackoff": f"{backoff.initial:.3f}s",
        "maxBackoff": f"{backoff.maximum:.3f}s",
        "backoffMultiplier": backoff.multiplier,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    names = [{"service": service, "method": method} for service, method in IDEMPOTENT]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


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

    def channel_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(self.retries, self.backoff)),
        ]
