"""GenerationService: protobuf in, domain request to the engine, domain events back to protobuf.

A translator only: validation lives in the engine, status codes in `errors`; a call holds one
of its tenant's `max_requests_in_flight` places from start to end. A client that
cancels, disconnects or passes its deadline cancels the handler; closing the engine's event
iterator then removes the sequence from the batch at the next step.

Knows nothing about batching, adapters' storage or the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from loraserve.api.access import CallRecord, observed
from loraserve.api.auth import caller
from loraserve.api.errors import abort_with
from loraserve.api.state import ServerState
from loraserve.types import (
    MAX_LOGIT_BIAS_TOKENS,
    Constraint,
    ConstraintKind,
    FinalEvent,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    LoraServeError,
    SamplingParams,
    TokenBias,
    TokenEvent,
    TopLogprob,
)
from loraserve_client.v1 import generation_pb2 as pb
from loraserve_client.v1 import generation_pb2_grpc

FINISH_REASONS = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
CONSTRAINT_KINDS = {
    "json_schema": ConstraintKind.JSON_SCHEMA,
    "regex": ConstraintKind.REGEX,
    "grammar": ConstraintKind.GRAMMAR,
}


def constraint_of(message: pb.GenerationInput) -> Constraint | None:
    if not message.HasField("constraint"):
        return None
    which = message.constraint.WhichOneof("kind")
    if which is None:
        raise InvalidRequestError(
            "input.constraint is empty: set json_schema, regex, grammar or choice"
        )
    if which == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=tuple(message.constraint.choice.values))
    return Constraint(CONSTRAINT_KINDS[which], getattr(message.constraint, which))


def to_domain(
    message: pb.GenerationInput, tenant: str, default_max_new_tokens: int
) -> GenerateRequest:
    """Translate the wire request; field-level problems name the field."""
    which = message.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("input.prompt is missing: set input.text or input.token_ids")
    if len(message.logit_bias) > MAX_LOGIT_BIAS_TOKENS:  # refused before building a value each
        raise InvalidRequestError(
            f"logit_bias names {len(message.logit_bias)} tokens, above the limit of "
            f"{MAX_LOGIT_BIAS_TOKENS}"
        )
    s = message.sampling
    sampling = SamplingParams(
        max_new_tokens=message.max_new_tokens or default_max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        stop=tuple(message.stop),
        seed=s.seed if s.HasField("seed") else None,
        logprobs=message.logprobs,
        ignore_eos=message.ignore_eos,
        top_logprobs=message.top_logprobs,
        logit_bias=tuple(
            TokenBias(token, bias) for token, bias in sorted(message.logit_bias.items())
        ),
        constraint=constraint_of(message),
    )
    return GenerateRequest(
        prompt=message.text if which == "text" else None,
        prompt_token_ids=tuple(message.token_ids.ids) if which == "token_ids" else None,
        adapter=message.adapter.name or None,
        adapter_version=message.adapter.version or None,
        tenant=tenant,
        sampling=sampling,
    )


def usage_of(final: FinalEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens)


def top_of(top: tuple[TopLogprob, ...]) -> list[pb.TopLogprob]:
    return [pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, text=t.text) for t in top]


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _events(
        self, message: pb.GenerationInput, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        runtime = await self.state.runtime_or_abort(context)
        tenant = (await caller(context, self.state.auth)).tenant
        record.named(tenant, message.adapter.name)
        limit = self.state.auth.quota(tenant).max_requests_in_flight
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.state.calls.generation(tenant, limit))
                request = to_domain(message, tenant, self.state.config.default_max_new_tokens)
                events = await runtime.engine.generate(request)
            except LoraServeError as error:
                await abort_with(context, error)
            try:
                async for event in events:
                    if isinstance(event, TokenEvent):
                        record.token()
                    else:
                        record.final(event)
                    yield event
            except LoraServeError as error:
                await abort_with(context, error)
            finally:
                await events.aclose()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async with observed(self.state.metrics, context, "Generate") as record:
            return await self._generate(request, context, record)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> pb.GenerateResponse:
        token_ids, logprobs, tops = [], [], []
        async for event in self._events(request.input, context, record):
            if isinstance(event, TokenEvent):
                token_ids.append(event.token_id)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
                if event.top_logprobs:
                    tops.append(pb.TopLogprobs(candidates=top_of(event.top_logprobs)))
            else:
                return pb.GenerateResponse(
                    text=event.text,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=FINISH_REASONS[event.finish_reason],
                    usage=usage_of(event),
                    top_logprobs=tops,
                )
        raise AssertionError("the engine ended a request without a final event")

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with observed(self.state.metrics, context, "GenerateStream") as record:
            async for event in self._events(request.input, context, record):
                if isinstance(event, TokenEvent):
                    token = pb.TokenEvent(
                        token_id=event.token_id,
                        text=event.text,
                        logprob=event.logprob,
                        top_logprobs=top_of(event.top_logprobs),
                    )
                    yield pb.GenerateStreamResponse(token=token)
                else:
                    final = pb.FinalEvent(
                        finish_reason=FINISH_REASONS[event.finish_reason], usage=usage_of(event)
                    )
                    yield pb.GenerateStreamResponse(final=final)
