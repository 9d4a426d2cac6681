"""Domain types shared by every layer: requests, sampling parameters, events and errors.

Knows nothing about torch, gRPC or the model. The API layer translates protobuf to and from
these; the engine consumes and produces them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class LoraServeError(Exception):
    """Base of every error loraserve reports to a caller; the message says what to fix."""


class InvalidRequestError(LoraServeError):
    """A request field is malformed or out of range (maps to INVALID_ARGUMENT)."""


class AdapterNotFoundError(LoraServeError):
    """The named adapter is not registered (maps to NOT_FOUND)."""


class AdapterRefusedError(LoraServeError):
    """An adapter was refused; `problems` lists every problem found, not just the first.

    Raised only as one of its two kinds below, which map to different status codes.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        detail = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(message + detail)


class AdapterIncompatibleError(AdapterRefusedError):
    """The adapter's files are valid LoRA but do not fit this base model (FAILED_PRECONDITION)."""


class InvalidAdapterError(AdapterRefusedError):
    """The adapter's files themselves are malformed or unsafe (maps to INVALID_ARGUMENT)."""


class CapacityError(LoraServeError):
    """No room right now: queue, KV budget or adapter slots are full (RESOURCE_EXHAUSTED)."""


class EngineDeadError(LoraServeError):
    """The engine loop stopped after an internal failure (maps to UNAVAILABLE)."""


# The tenant of every caller when the server runs without API keys (development mode).
DEFAULT_TENANT = "default"

# Beyond these, dividing float32 logits overflows and sampling would produce NaNs.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_PENALTY, MAX_PENALTY = 1e-2, 100.0


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature == 0 means greedy (top_k / top_p ignored).

    `seed` makes a sampled request reproducible whatever else shares its batch; without it the
    request draws from a fresh random seed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidRequestError naming every impossible value."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            problems.append(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature}"
            )
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not (MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY):
            problems.append(
                f"repetition_penalty must be in [{MIN_PENALTY}, {MAX_PENALTY}] (1 disables it), "
                f"got {self.repetition_penalty}"
            )
        if any(not s for s in self.stop):
            problems.append("stop sequences must be non-empty strings")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            problems.append(f"seed must be in [0, 2^63), got {self.seed}")
        if problems:
            raise InvalidRequestError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text or token ids), an optional adapter, sampling parameters.

    `adapter` is the adapter's name (None or "" runs the base model alone), looked up in
    `tenant`'s adapters first, then among shared ones; `adapter_version` None means the latest.
    """

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    tenant: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the printable text it completes (may be empty while a
    multi-byte character or a possible stop sequence is still pending)."""

    token_id: int
    text: str
    logprob: float | None = None


@dataclass(frozen=True)
class FinalEvent:
    """The last event of every request."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
