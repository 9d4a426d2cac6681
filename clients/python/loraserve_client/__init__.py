"""A Python client for loraserve: `Client` (blocking) and `AsyncClient` (asyncio), typed errors,
plain dataclass results, and the `generate` / `adapters` / `health` / `info` commands.

Speaks only the loraserve.v1 gRPC contract and the standard health service; imports neither
torch nor any part of the server.
"""

from loraserve_client.aio import AsyncClient, AsyncGenerationStream
from loraserve_client.calls import Backoff
from loraserve_client.client import Client, GenerationStream
from loraserve_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoraServeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from loraserve_client.types import (
    Adapter,
    AdapterFile,
    Finished,
    GenerateOptions,
    GenerateResult,
    StreamEvent,
    TokenChunk,
    TopLogprob,
)

__all__ = [
    "Adapter",
    "AdapterFile",
    "AsyncClient",
    "AsyncGenerationStream",
    "Backoff",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Finished",
    "GenerateOptions",
    "GenerateResult",
    "GenerationStream",
    "Internal",
    "InvalidArgument",
    "LoraServeError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamEvent",
    "TokenChunk",
    "TopLogprob",
    "Unauthenticated",
    "Unavailable",
]
