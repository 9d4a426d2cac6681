"""Each generation call's end: its status counted in `loraserve_grpc_responses_total` and one
access-log line (logger `loraserve.access`) with tenant, adapter, prompt and completion tokens,
time to first token, duration and status.

The status is the one the handler ended with. A call that produced its final event succeeded,
whatever the client does next: a streaming client that closes the call as soon as it has the
last message makes grpc close the handler's generator (GeneratorExit) or cancel it, and that is
still OK, never UNKNOWN. Before the final event, a closed or cancelled call is CANCELLED, or
DEADLINE_EXCEEDED when its deadline passed (also counted as a rejection); an abort is the code
it aborted with.

Knows nothing about what the calls do: the servicer fills in the `CallRecord` as events pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from loraserve.metrics import Metrics
from loraserve.types import FinalEvent, shown

log = logging.getLogger("loraserve.access")


@dataclass
class CallRecord:
    """What the access log says about one call, filled in while it runs."""

    method: str
    started: float = field(default_factory=time.monotonic)
    tenant: str = ""
    adapter: str = ""  # as the caller named it (quoted, bounded): the line is written for all
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    finished: bool = False  # the final event was produced

    def named(self, tenant: str, adapter: str | None) -> None:
        self.tenant = tenant
        self.adapter = shown(adapter)[1:-1] if adapter else ""

    def token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started

    def final(self, event: FinalEvent) -> None:
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = event.completion_tokens
        self.finished = True

    def fields(self, code: grpc.StatusCode) -> dict[str, object]:
        ttft = None if self.first_token_s is None else round(self.first_token_s, 4)
        return {
            "method": self.method,
            "status": code.name,
            "tenant": self.tenant,
            "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": ttft,
            "duration_s": round(time.monotonic() - self.started, 4),
        }


def _ended_early(context: grpc.aio.ServicerContext, metrics: Metrics) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        metrics.requests_rejected.labels("deadline").inc()
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@contextlib.asynccontextmanager
async def observed(
    metrics: Metrics, context: grpc.aio.ServicerContext, method: str
) -> AsyncIterator[CallRecord]:
    """Count the call's final status and write its access-log line."""
    record = CallRecord(method)
    code = grpc.StatusCode.OK
    try:
        yield record
    except (asyncio.CancelledError, GeneratorExit):
        if not record.finished:
            code = _ended_early(context, metrics)
        raise
    except BaseException:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    finally:  # the line first: whoever sees the count can read the line
        log.info("%s %s", method, code.name, extra={"fields": record.fields(code)})
        metrics.responses.labels(method, code.name).inc()
