"""The plain values the client takes and returns: generation options, results, stream events
and adapters.

Frozen dataclasses of Python types only; callers never see a protobuf message. Knows nothing
about gRPC or how these values are built (that is `messages`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class GenerateOptions:
    """How to generate: the adapter (None: the base model alone; version None: the latest),
    sampling, and when to stop. None leaves a field to the server; max_new_tokens 0 takes the
    server's default. ignore_eos keeps generating past end-of-sequence up to max_new_tokens.

    At most one constraint: json_schema (a dict, or JSON text), regex, grammar (GBNF or Lark
    text) or choice (the strings the output is one of). top_logprobs (0 to 20) returns that many
    most likely tokens per step; logit_bias maps token ids to a value added to their logits."""

    adapter: str | None = None
    version: str | None = None
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    json_schema: str | Mapping[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: Sequence[str] | None = None
    top_logprobs: int = 0
    logit_bias: Mapping[int, float] | None = None

    @classmethod
    def merged(
        cls, options: GenerateOptions | None, overrides: Mapping[str, Any]
    ) -> GenerateOptions:
        """`options` (or the defaults) with `overrides` (field name -> value) applied."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generate options {unknown}; see GenerateOptions")
        return replace(options or cls(), **overrides)


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step, with its log-probability and its text alone."""

    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    # One per token when logprobs (or top_logprobs) was asked for, else empty.
    logprobs: list[float]
    # "eos", "length", "stop" or "cancelled". With a constraint, "eos" means the text matches
    # it and "length" that max_new_tokens cut it.
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # One list per token, most likely first, when top_logprobs was asked for, else empty.
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenChunk:
    """One generated token of a stream."""

    token_id: int
    # Text this token completes; empty while a multi-byte character or stop string is pending.
    text: str
    logprob: float | None
    # The most likely tokens at this step, when top_logprobs was asked for.
    top_logprobs: list[TopLogprob] = field(default_factory=list)


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
