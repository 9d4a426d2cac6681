"""The plain values the client returns: generation results, stream events and adapters.

Frozen dataclasses of Python types only; callers never see a protobuf message. Knows nothing
about gRPC or how these values are built (that is `messages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    # One per token when logprobs was asked for, else empty.
    logprobs: list[float]
    # "eos", "length", "stop" or "cancelled".
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TokenChunk:
    """One generated token of a stream."""

    token_id: int
    # Text this token completes; empty while a multi-byte character or stop string is pending.
    text: str
    logprob: float | None


@dataclass(frozen=True)
class Finished:
    """The last event of every stream."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


StreamEvent = TokenChunk | Finished


@dataclass(frozen=True)
class AdapterFile:
    filename: str
    # Lower-case hex SHA-256 of the whole file.
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Adapter:
    name: str
    version: str
    tenant: str
    rank: int
    target_modules: list[str]
    lora_alpha: float
    use_rslora: bool
    dtype: str
    create_time: datetime | None
    files: list[AdapterFile]
    shared: bool
    pinned: bool
    # "disk", "host", "device" or "unspecified".
    residency: str
