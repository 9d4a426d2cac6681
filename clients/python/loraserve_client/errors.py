"""Typed exceptions for loraserve calls, and the one mapping from `grpc.RpcError` to them.

Every exception carries the gRPC status `code` and the server's `details`. Knows nothing about
which call failed or whether it may be retried (that is `calls`).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class LoraServeError(Exception):
    """A failed call: `code` is the gRPC status, `details` the server's (or client's) message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}")


class InvalidArgument(LoraServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoraServeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(LoraServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoraServeError):
    """The server is at capacity; `retry_after` is its hint in seconds, None when absent."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str, retry_after: float | None = None) -> None:
        super().__init__(details)
        self.retry_after = retry_after


class Unavailable(LoraServeError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LoraServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LoraServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(LoraServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LoraServeError):
    code = grpc.StatusCode.CANCELLED


class Internal(LoraServeError):
    code = grpc.StatusCode.INTERNAL


ERROR_CLASSES: dict[grpc.StatusCode, type[LoraServeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def retry_after_seconds(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's hint in seconds: the standard `grpc-retry-pushback-ms` trailer, else the
    older `retry-after-ms`; None when neither is there or it is not a number."""
    hints = dict(metadata or ())
    value = hints.get("grpc-retry-pushback-ms", hints.get("retry-after-ms"))
    if value is None:
        return None
    try:
        return int(value) / 1000
    except ValueError:
        return None


def error_from_rpc(error: grpc.RpcError) -> LoraServeError:
    """The typed exception for a failed call (sync or grpc.aio); unknown codes keep their code."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details, retry_after_seconds(error.trailing_metadata()))
    cls = ERROR_CLASSES.get(code)
    return cls(details) if cls is not None else LoraServeError(details, code)
