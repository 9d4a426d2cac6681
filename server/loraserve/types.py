"""Domain types shared by every layer: requests, sampling parameters, events and errors.

Knows nothing about torch, gRPC or the model. The API layer translates protobuf to and from
these; the engine consumes and produces them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Bounds on what an error echoes back, so no input can make a reply (or a log line) large.
MAX_MESSAGE_CHARS = 2400
MAX_PROBLEMS_SHOWN = 10  # an adapter error lists this many problems, then "and N more"
MAX_PROBLEM_CHARS = 200
MAX_HEADLINE_CHARS = 200  # of an adapter error's first line
MAX_SHOWN_CHARS = 80  # of a caller's name or value quoted in a message


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} characters)"
    return text[: max(0, limit - len(note))] + note


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """An ASCII repr of `value` for a message, about `limit` characters at most however large
    `value` is (a caller's name is quoted, never echoed whole)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!a}... ({len(value)} long)"
    return clip(ascii(value), 2 * limit)


class LoraServeError(Exception):
    """Base of every error loraserve reports to a caller; the message says what to fix.

    The message is capped at MAX_MESSAGE_CHARS, whatever the caller sent.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(clip(str(message), MAX_MESSAGE_CHARS))


class InvalidRequestError(LoraServeError):
    """A request field is malformed or out of range (maps to INVALID_ARGUMENT)."""


class AdapterNotFoundError(LoraServeError):
    """The named adapter is not registered (maps to NOT_FOUND)."""


class AdapterRefusedError(LoraServeError):
    """An adapter was refused; `problems` lists every problem found, not just the first.

    Every problem is found; `problems` keeps the first MAX_PROBLEMS_SHOWN (each cut to
    MAX_PROBLEM_CHARS) and `omitted` counts the rest, so the message stays small. Raised only
    as one of its two kinds below, which map to different status codes.
    """

    def __init__(self, message: str, problems: list[str] | None = None, omitted: int = 0) -> None:
        problems = problems or []
        self.headline = clip(message, MAX_HEADLINE_CHARS)
        self.problems = [clip(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS_SHOWN]]
        self.omitted = omitted + len(problems) - len(self.problems)
        super().__init__(self.headline + "".join(f"\n  - {p}" for p in self._listed()))

    def _listed(self) -> list[str]:
        return self.problems + ([f"and {self.omitted} more"] if self.omitted else [])

    def one_line(self) -> str:
        """The headline and its problems on one line (for a log line)."""
        return " ".join([self.headline, "; ".join(self._listed())]).strip()

    def reworded(self, message: str) -> AdapterRefusedError:
        """The same problems under a new headline (of the same error type)."""
        return type(self)(message, self.problems, self.omitted)


class AdapterIncompatibleError(AdapterRefusedError):
    """The adapter's files are valid LoRA but do not fit this base model (FAILED_PRECONDITION)."""


class InvalidAdapterError(AdapterRefusedError):
    """The adapter's files themselves are malformed or unsafe (maps to INVALID_ARGUMENT)."""


class CapacityError(LoraServeError):
    """No room right now: queue, KV budget or adapter slots are full, or the tenant has its
    quota of requests in flight (RESOURCE_EXHAUSTED, with a retry hint)."""


class QuotaExceededError(LoraServeError):
    """A tenant's storage quota would be exceeded; retrying will not help until it deletes
    (RESOURCE_EXHAUSTED, without a retry hint)."""


class AdapterExistsError(LoraServeError):
    """The version being uploaded already exists: versions are immutable (ALREADY_EXISTS)."""


class ReadOnlyAdapterError(LoraServeError):
    """A shared adapter (the operator's) cannot be changed by a tenant (PERMISSION_DENIED)."""


class IdleUploadError(LoraServeError):
    """An upload stream stopped sending for longer than the idle timeout (DEADLINE_EXCEEDED)."""


class EngineDeadError(LoraServeError):
    """The engine loop stopped after an internal failure (maps to UNAVAILABLE)."""


# The tenant of every caller when the server runs without API keys (development mode).
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class TenantQuota:
    """What one tenant may hold and run at once; None is no limit (the keys file sets these).

    max_adapters: adapter names stored; max_versions: versions stored, over all its adapters;
    max_stored_bytes: bytes of adapter files stored; max_requests_in_flight: Generate and
    GenerateStream calls running or queued at once.
    """

    max_adapters: int | None = None
    max_versions: int | None = None
    max_stored_bytes: int | None = None
    max_requests_in_flight: int | None = None


UNLIMITED = TenantQuota()

# Beyond these, dividing float32 logits overflows and sampling would produce NaNs.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_PENALTY, MAX_PENALTY = 1e-2, 100.0
# As the OpenAI API bounds them: alternatives per token, biased tokens, and the bias itself.
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_TOKENS = 300
MIN_LOGIT_BIAS, MAX_LOGIT_BIAS = -100.0, 100.0
MAX_CHOICES = 1024


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"


class ConstraintKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    GRAMMAR = "grammar"  # GBNF (llama.cpp) or Lark
    CHOICE = "choice"


@dataclass(frozen=True)
class Constraint:
    """What the output must match: `text` is the JSON schema, the regular expression or the
    grammar; `choices` the strings a CHOICE constraint picks one of (its `text` is empty).

    Whether `text` compiles, and within what size, the engine's grammar compiler decides.
    """

    kind: ConstraintKind
    text: str = ""
    choices: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        if self.kind is ConstraintKind.CHOICE:
            if not self.choices or len(self.choices) > MAX_CHOICES:
                return [f"a choice constraint needs 1 to {MAX_CHOICES} strings, got "
                        f"{len(self.choices)}"]  # fmt: skip
            if not all(self.choices):
                return ["a choice constraint's strings must be non-empty"]
            return []
        if not self.text:
            return [f"the {self.kind.value} constraint is empty"]
        return []


@dataclass(frozen=True)
class TokenBias:
    """`bias` is added to the logit of `token_id` before constraints and sampling."""

    token_id: int
    bias: float


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature == 0 means greedy (top_k / top_p ignored).

    `seed` makes a sampled request reproducible whatever else shares its batch; without it the
    request draws from a fresh random seed.

    `constraint` restricts every next token to those that keep the output a prefix of its
    language; `logit_bias` shifts the named tokens' logits first. `top_logprobs` asks for that
    many most likely alternatives per token (implies `logprobs`).
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
    top_logprobs: int = 0
    logit_bias: tuple[TokenBias, ...] = ()
    constraint: Constraint | None = None

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
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            problems.append(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        problems += self._bias_problems()
        if self.constraint is not None:
            problems += self.constraint.problems()
            if self.stop:
                problems.append(
                    "stop sequences cannot be combined with a constraint (a stop would cut the "
                    "output where it may not parse): end the output in the grammar instead"
                )
        if problems:
            raise InvalidRequestError("invalid sampling parameters: " + "; ".join(problems))

    def _bias_problems(self) -> list[str]:
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            return [
                f"logit_bias names {len(self.logit_bias)} tokens, above the limit of "
                f"{MAX_LOGIT_BIAS_TOKENS}"
            ]
        problems = []
        if len({b.token_id for b in self.logit_bias}) < len(self.logit_bias):
            problems.append("logit_bias names a token twice")
        out_of_range = [
            b for b in self.logit_bias
            if not (math.isfinite(b.bias) and MIN_LOGIT_BIAS <= b.bias <= MAX_LOGIT_BIAS)
        ]  # fmt: skip
        if out_of_range:
            problems.append(
                f"logit_bias values must be finite and in [{MIN_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                f"got {out_of_range[0].bias} for token {out_of_range[0].token_id}"
            )
        if any(b.token_id < 0 for b in self.logit_bias):
            problems.append("logit_bias token ids must be >= 0")
        return problems

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation, rendered into a prompt by the model's chat template."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text, token ids or chat messages), an optional adapter,
    sampling parameters.

    `adapter` is the adapter's name (None or "" runs the base model alone), looked up in
    `tenant`'s adapters first, then among shared ones; `adapter_version` None means the latest.
    """

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatTurn, ...] | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    tenant: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step: its id, log-probability and decoded text (a
    token that holds part of a multi-byte character decodes to U+FFFD)."""

    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the printable text it completes (may be empty while a
    multi-byte character or a possible stop sequence is still pending). `top_logprobs` holds
    the most likely tokens at this step, most likely first, when they were asked for."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class FinalEvent:
    """The last event of every request."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
