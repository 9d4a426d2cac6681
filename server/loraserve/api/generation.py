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

from loraserve.api.auth import caller
from loraserve.api.errors import abort_with, observed
from loraserve.api.state import ServerState
from loraserve.types import (
    FinalEvent,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    LoraServeError,
    SamplingParams,
    TokenEvent,
)
from loraserve.v1 import generation_pb2 as pb
from loraserve.v1 import generation_pb2_grpc

FINISH_REASONS = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def to_domain(
    message: pb.GenerationInput, tenant: str, default_max_new_tokens: int
) -> GenerateRequest:
    """Translate the wire request; field-level problems name the field."""
    which = message.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("input.prompt is missing: set input.text or input.token_ids")
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


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _events(
        self, message: pb.GenerationInput, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        runtime = await self.state.runtime_or_abort(context)
        tenant = (await caller(context, self.state.auth)).tenant
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
                    yield event
            except LoraServeError as error:
                await abort_with(context, error)
            finally:
                await events.aclose()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async with observed(self.state.metrics, context, "Generate"):
            return await self._generate(request, context)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        token_ids, logprobs = [], []
        async for event in self._events(request.input, context):
            if isinstance(event, TokenEvent):
                token_ids.append(event.token_id)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
            else:
                return pb.GenerateResponse(
                    text=event.text,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=FINISH_REASONS[event.finish_reason],
                    usage=usage_of(event),
                )
        raise AssertionError("the engine ended a request without a final event")

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with observed(self.state.metrics, context, "GenerateStream"):
            async for event in self._events(request.input, context):
                if isinstance(event, TokenEvent):
                    token = pb.TokenEvent(
                        token_id=event.token_id, text=event.text, logprob=event.logprob
                    )
                    yield pb.GenerateStreamResponse(token=token)
                else:
                    final = pb.FinalEvent(
                        finish_reason=FINISH_REASONS[event.finish_reason], usage=usage_of(event)
                    )
                    yield pb.GenerateStreamResponse(final=final)
