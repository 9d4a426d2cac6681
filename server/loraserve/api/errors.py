"""The one table from domain errors to gRPC status codes, and the helper that aborts with it.

Knows nothing about the engine: it sees exception types and messages only.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraserve.types import (
    AdapterExistsError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    CapacityError,
    EngineDeadError,
    IdleUploadError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraServeError,
    QuotaExceededError,
    ReadOnlyAdapterError,
    clip,
)

RETRY_AFTER_S = 1
MAX_TRAILER_BYTES = 7000  # what an error adds to the trailers: under grpc's 8 KiB default
MAX_MESSAGE_BYTES = 2600  # of those, for the message as grpc-message carries it

STATUS_OF: dict[type[LoraServeError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidAdapterError: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterIncompatibleError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterNotFoundError: grpc.StatusCode.NOT_FOUND,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AdapterExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ReadOnlyAdapterError: grpc.StatusCode.PERMISSION_DENIED,
    IdleUploadError: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineDeadError: grpc.StatusCode.UNAVAILABLE,
}
RETRYABLE = (CapacityError,)  # RESOURCE_EXHAUSTED with a retry hint: the room comes back


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status for `error`: its most specific class in the table, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def _header_bytes(message: str) -> int:
    """The size of `message` as grpc sends it: printable ASCII but '%' as is, the rest as %XX."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())


def _trailer_bytes(message: str, status: status_pb2.Status) -> int:
    """grpc-message plus the base64 grpc-status-details-bin that carries `status`."""
    return _header_bytes(message) + 4 * (status.ByteSize() + 2) // 3


def rich_status(code: grpc.StatusCode, message: str, error: BaseException) -> status_pb2.Status:
    """A google.rpc.Status with details where they help: RetryInfo when at capacity (not over
    a storage quota: only a delete makes room there), and a
    BadRequest listing an adapter's problems (its field: the module or file named), as many as
    fit in MAX_TRAILER_BYTES with the message."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if isinstance(error, RETRYABLE):
        retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_S))
        status.details.add().Pack(retry)
    problems = getattr(error, "problems", None)
    if problems:
        bad_request = error_details_pb2.BadRequest()
        for p in problems:
            field = p.split(": ", 1)[0] if ": " in p else "adapter"
            bad_request.field_violations.add(field=clip(field, 80), description=p)
            candidate = status_pb2.Status()
            candidate.CopyFrom(status)
            candidate.details.add().Pack(bad_request)
            if _trailer_bytes(message, candidate) > MAX_TRAILER_BYTES:
                del bad_request.field_violations[-1]
                break
        if bad_request.field_violations:
            status.details.add().Pack(bad_request)
    return status


def bounded_message(error: BaseException) -> str:
    """The message a caller sees: ASCII, and short enough to leave room for the details."""
    message = str(error).encode("ascii", "backslashreplace").decode()
    while _header_bytes(message) > MAX_MESSAGE_BYTES:
        message = clip(message, len(message) * 2 // 3)
    return message


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    trailing: tuple[tuple[str, str | bytes], ...] = (),
) -> NoReturn:
    """End the call with `code` (`context.abort` raises; this says so to the type checker)."""
    await context.abort(code, message, trailing)
    raise RuntimeError("grpc's context.abort returned instead of raising")


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the mapped status and rich details; unexpected errors never leak
    internals. At capacity, the standard `grpc-retry-pushback-ms` trailer (which gRPC's own
    retries obey, in every language) and the older `retry-after-ms` repeat the RetryInfo hint."""
    code = status_of(error)
    message = "internal error; see server log"
    if code != grpc.StatusCode.INTERNAL:
        message = bounded_message(error)
    trailing = tuple(rpc_status.to_status(rich_status(code, message, error)).trailing_metadata)
    if isinstance(error, RETRYABLE):
        milliseconds = str(RETRY_AFTER_S * 1000)
        trailing += (("grpc-retry-pushback-ms", milliseconds), ("retry-after-ms", milliseconds))
    await abort(context, code, message, trailing)
