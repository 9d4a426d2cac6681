"""OpenAI bodies to the domain request, and the engine's events back to OpenAI's JSON.

The same translation the gRPC servicer does, from another wire format: `model` names the base
(`ServerConfig.base_model_id`) or one of the caller's adapters (`name` for its latest version,
`name@version` for one), `max_tokens` is `max_new_tokens`, `response_format` a JSON-schema
constraint. What the engine does not support (several choices, penalties on presence or
frequency, echo, suffix) is refused here by name; whether a value is in range the engine's
intake decides, for both APIs alike.

Knows nothing about HTTP, auth or the engine's insides.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from loraserve.api.http.schemas import ChatBody, CompletionBody, GenerationBody, ResponseFormat
from loraserve.types import (
    MAX_LOGIT_BIAS_TOKENS,
    ChatTurn,
    Constraint,
    ConstraintKind,
    FinalEvent,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
    TokenBias,
    TokenEvent,
    shown,
)

FINISH_REASONS = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
}
ANY_OBJECT = '{"type": "object"}'


def adapter_of(model: str, base_model_id: str) -> tuple[str | None, str | None]:
    """(adapter name, version) that `model` names; (None, None) for the base model."""
    if model == base_model_id:
        return None, None
    name, at, version = model.partition("@")
    if at and not version:
        raise InvalidRequestError(f"model {shown(model)} ends in '@': give name@version or name")
    return name, version or None


def _refuse_unsupported(body: GenerationBody) -> None:
    problems = []
    if body.n != 1:
        problems.append(f"n must be 1 (one choice per request), got {body.n}")
    if body.presence_penalty or body.frequency_penalty:
        problems.append(
            "presence_penalty and frequency_penalty are not supported; use repetition_penalty"
        )
    if isinstance(body, CompletionBody) and (
        body.echo or body.suffix is not None or (body.best_of or 1) != 1
    ):
        problems.append("echo, suffix and best_of are not supported")
    if problems:
        raise InvalidRequestError("; ".join(problems))


def _constraint(response_format: ResponseFormat | None) -> Constraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint(ConstraintKind.JSON_SCHEMA, ANY_OBJECT)
    if response_format.json_schema is None:
        raise InvalidRequestError("response_format.json_schema is missing for type json_schema")
    schema = response_format.json_schema.json_schema
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


def _logit_bias(bias: dict[str, float] | None) -> tuple[TokenBias, ...]:
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidRequestError(
            f"logit_bias names {len(bias)} tokens, above the limit of {MAX_LOGIT_BIAS_TOKENS}"
        )
    pairs = []
    for token, value in bias.items():
        if not token.isdigit():
            raise InvalidRequestError(
                f"logit_bias keys are token ids written as strings, got {shown(token)}"
            )
        pairs.append(TokenBias(int(token), value))
    return tuple(sorted(pairs, key=lambda b: b.token_id))


def _sampling(
    body: GenerationBody, max_tokens: int | None, top_logprobs: int, logprobs: bool, default: int
) -> SamplingParams:
    _refuse_unsupported(body)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_new_tokens=default if max_tokens is None else max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        stop=stop,
        seed=body.seed,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body.logit_bias),
        constraint=_constraint(body.response_format),
    )


def completion_request(
    body: CompletionBody, tenant: str, base_model_id: str, default_max_tokens: int
) -> GenerateRequest:
    adapter, version = adapter_of(body.model, base_model_id)
    logprobs = body.logprobs is not None
    sampling = _sampling(body, body.max_tokens, body.logprobs or 0, logprobs, default_max_tokens)
    prompt = body.prompt
    return GenerateRequest(
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=None if isinstance(prompt, str) else tuple(prompt),
        adapter=adapter,
        adapter_version=version,
        tenant=tenant,
        sampling=sampling,
    )


def chat_request(
    body: ChatBody, tenant: str, base_model_id: str, default_max_tokens: int
) -> GenerateRequest:
    adapter, version = adapter_of(body.model, base_model_id)
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    top = body.top_logprobs or 0
    sampling = _sampling(body, max_tokens, top, body.logprobs, default_max_tokens)
    return GenerateRequest(
        messages=tuple(ChatTurn(m.role, m.text) for m in body.messages),
        adapter=adapter,
        adapter_version=version,
        tenant=tenant,
        sampling=sampling,
    )


def usage(final: FinalEvent) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


@dataclass
class Reply:
    """One response being written: its id, its kind's JSON shapes and what it has gathered.

    chat: chat.completion shapes (else text_completion); token_ids: include the generated ids
    (vLLM's `return_token_ids`)."""

    model: str
    chat: bool
    token_ids: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    tokens: list[TokenEvent] = field(default_factory=list)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, choice: dict, chunk: bool) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _logprobs(self, tokens: list[TokenEvent]) -> dict | None:
        """OpenAI's logprobs of `tokens`; a token's text is the text it completed."""
        if not tokens or tokens[0].logprob is None:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": t.text,
                        "logprob": t.logprob,
                        "bytes": list(t.text.encode()),
                        "top_logprobs": [
                            {"token": c.text, "logprob": c.logprob, "bytes": list(c.text.encode())}
                            for c in t.top_logprobs
                        ],
                    }
                    for t in tokens
                ]
            }
        return {
            "tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{c.text: c.logprob for c in t.top_logprobs} for t in tokens],
        }

    def _choice(self, text: str, tokens: list[TokenEvent], reason: str | None, chunk: bool) -> dict:
        choice: dict = {"index": 0, "logprobs": self._logprobs(tokens), "finish_reason": reason}
        if not self.chat:
            choice["text"] = text
        elif chunk:
            delta = {"role": "assistant", "content": text}
            choice["delta"] = delta if reason is None else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        if self.token_ids:
            choice["token_ids"] = [t.token_id for t in tokens]
        return choice

    def whole(self, final: FinalEvent) -> dict:
        """The non-streaming response."""
        reason = FINISH_REASONS[final.finish_reason]
        body = self._envelope(self._choice(final.text, self.tokens, reason, chunk=False), False)
        body["usage"] = usage(final)
        return body

    def chunk(self, event: TokenEvent) -> dict:
        return self._envelope(self._choice(event.text, [event], None, chunk=True), True)

    def last_chunk(self, final: FinalEvent) -> dict:
        reason = FINISH_REASONS[final.finish_reason]
        return self._envelope(self._choice("", [], reason, chunk=True), True)

    def usage_chunk(self, final: FinalEvent) -> dict:
        """What `stream_options.include_usage` adds after the last choice: usage, no choices."""
        body = self._envelope({}, True)
        body["choices"] = []
        body["usage"] = usage(final)
        return body
