"""Server-sent events for streamed completions: the response that writes them, and the
generator that turns the engine's events into OpenAI's chunks, ending in `data: [DONE]`, or in
one `data: {"error": ...}` event when the request fails after the stream began.

Knows nothing about routes, auth or the engine's insides.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from starlette.responses import StreamingResponse

from loraserve.api.http.errors import HttpError, log_unexpected
from loraserve.api.http.translate import Reply
from loraserve.types import FinalEvent, TokenEvent

Events = AsyncGenerator[TokenEvent | FinalEvent, None]


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events from `chunks`; `ended` runs once however the response ends. A client
    that disconnects cancels the task writing the events, possibly before `chunks` started (so
    the generator cannot be what releases the call: `ended` is)."""

    def __init__(
        self, chunks: AsyncGenerator[bytes, None], ended: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            chunks, headers={"Cache-Control": "no-cache"}, media_type="text/event-stream"
        )
        self.chunks = chunks
        self.ended = ended

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.chunks.aclose()
            await self.ended()


@dataclass
class Outcome:
    """How a streamed call ended, as the gRPC status it counts as."""

    code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # until the stream says otherwise


async def stream(
    events: Events, reply: Reply, include_usage: bool, outcome: Outcome
) -> AsyncGenerator[bytes, None]:
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                yield sse(reply.chunk(event))
                continue
            yield sse(reply.last_chunk(event))
            if include_usage:
                yield sse(reply.usage_chunk(event))
        yield sse("[DONE]")
        outcome.code = grpc.StatusCode.OK
    except Exception as error:  # after the first byte: the error is the stream's last event
        refusal = HttpError.of(error)
        outcome.code = refusal.code
        log_unexpected(error, refusal)
        yield sse(refusal.payload())
