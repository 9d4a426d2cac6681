"""Translation between the client's arguments and values and the loraserve.v1 protobuf messages.

The only module besides `upload` that builds or reads protobuf messages; the clients pass
what it returns straight to the stubs and back to the caller. Knows nothing about channels,
deadlines or retries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timezone

from grpc_health.v1 import health_pb2

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
from loraserve_client.v1 import adapters_pb2, generation_pb2, server_pb2

FINISH_REASONS: dict[int, str] = {
    generation_pb2.FINISH_REASON_EOS: "eos",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
RESIDENCIES: dict[int, str] = {
    adapters_pb2.RESIDENCY_DISK: "disk",
    adapters_pb2.RESIDENCY_HOST: "host",
    adapters_pb2.RESIDENCY_DEVICE: "device",
}


def generation_input(
    prompt: str | Sequence[int], options: GenerateOptions
) -> generation_pb2.GenerationInput:
    """The request body shared by Generate and GenerateStream; None leaves a field unset."""
    o = options
    message = generation_pb2.GenerationInput(
        adapter=generation_pb2.AdapterRef(name=o.adapter or "", version=o.version or ""),
        sampling=generation_pb2.SamplingParams(
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            repetition_penalty=o.repetition_penalty,
            seed=o.seed,
        ),
        max_new_tokens=o.max_new_tokens,
        stop=[o.stop] if isinstance(o.stop, str) else list(o.stop),
        logprobs=o.logprobs,
        ignore_eos=o.ignore_eos,
        constraint=constraint_of(o),
        top_logprobs=o.top_logprobs,
        logit_bias=dict(o.logit_bias or {}),
    )
    if isinstance(prompt, str):
        message.text = prompt
    else:
        message.token_ids.ids.extend(prompt)
    return message


def constraint_of(options: GenerateOptions) -> generation_pb2.Constraint | None:
    """The options' one constraint, or None; ValueError when more than one is given."""
    given = {
        name: value
        for name in ("json_schema", "regex", "grammar", "choice")
        if (value := getattr(options, name)) is not None
    }
    if len(given) > 1:
        raise ValueError(f"give at most one constraint, not {' and '.join(sorted(given))}")
    if not given:
        return None
    [(name, value)] = given.items()
    if name == "choice":
        return generation_pb2.Constraint(choice=generation_pb2.Choices(values=list(value)))
    constraint = generation_pb2.Constraint()
    setattr(constraint, name, value if isinstance(value, str) else json.dumps(value))
    return constraint


def top_logprobs_of(candidates: Sequence[generation_pb2.TopLogprob]) -> list[TopLogprob]:
    return [TopLogprob(token_id=c.token_id, logprob=c.logprob, text=c.text) for c in candidates]


def finish_reason_of(value: int) -> str:
    return FINISH_REASONS.get(value, "unspecified")


def result_of(reply: generation_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=reply.text,
        token_ids=list(reply.token_ids),
        logprobs=list(reply.logprobs),
        finish_reason=finish_reason_of(reply.finish_reason),
        prompt_tokens=reply.usage.prompt_tokens,
        completion_tokens=reply.usage.completion_tokens,
        top_logprobs=[top_logprobs_of(t.candidates) for t in reply.top_logprobs],
    )


def event_of(message: generation_pb2.GenerateStreamResponse) -> StreamEvent:
    if message.WhichOneof("event") == "token":
        token = message.token
        return TokenChunk(
            token_id=token.token_id,
            text=token.text,
            logprob=token.logprob if token.HasField("logprob") else None,
            top_logprobs=top_logprobs_of(token.top_logprobs),
        )
    final = message.final
    return Finished(
        finish_reason=finish_reason_of(final.finish_reason),
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
    )


def server_info_of(reply: server_pb2.GetServerInfoResponse) -> dict[str, str | int | bool]:
    """Every field of the reply by its proto name, defaults included."""
    return {field.name: getattr(reply, field.name) for field in reply.DESCRIPTOR.fields}


def health_status_of(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def adapter_of(message: adapters_pb2.Adapter) -> Adapter:
    create_time = (
        message.create_time.ToDatetime(tzinfo=timezone.utc)
        if message.HasField("create_time")
        else None
    )
    return Adapter(
        name=message.name,
        version=message.version,
        tenant=message.tenant,
        rank=message.rank,
        target_modules=list(message.target_modules),
        lora_alpha=message.lora_alpha,
        use_rslora=message.use_rslora,
        dtype=message.dtype,
        create_time=create_time,
        files=[
            AdapterFile(filename=f.filename, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in message.files
        ],
        shared=message.shared,
        pinned=message.pinned,
        residency=residency_of(message.residency),
    )


def residency_of(value: int) -> str:
    return RESIDENCIES.get(value, "unspecified")
