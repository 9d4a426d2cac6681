"""The one table from domain errors to gRPC status codes, the helper that aborts with it, and
the context that counts every call's final status.

Knows nothing about the engine: it sees exception types and messages only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from loraserve.metrics import Metrics
from loraserve.types import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    CapacityError,
    EngineDeadError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraServeError,
)

STATUS_OF: dict[type[LoraServeError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidAdapterError: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterIncompatibleError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterNotFoundError: grpc.StatusCode.NOT_FOUND,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineDeadError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status for `error`: its most specific class in the table, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the call with the mapped status; unexpected errors never leak internals."""
    code = status_of(error)
    message = str(error) if code != grpc.StatusCode.INTERNAL else "internal error; see server log"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        context.set_trailing_metadata((("retry-after-ms", "1000"),))
    await context.abort(code, message)


@contextlib.asynccontextmanager
async def observed(
    metrics: Metrics, context: grpc.aio.ServicerContext, method: str
) -> AsyncIterator[None]:
    """Count the call's final status code; a deadline that passed also counts as a rejection."""
    code = grpc.StatusCode.OK
    try:
        yield
    except asyncio.CancelledError:
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        if expired:
            metrics.requests_rejected.labels("deadline").inc()
        raise
    except BaseException:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    finally:
        metrics.responses.labels(method, code.name).inc()
