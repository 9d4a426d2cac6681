"""Rebuilding a grpc method handler around a wrapped behaviour, keeping its streaming kind.

The interceptors (`decoding`, `calls`) wrap what a method does without knowing which of the
four kinds it is; `rewrapped` picks grpc's constructor for the kind and keeps the serializers.

Knows nothing about what the methods do.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc

# (request streaming, response streaming) -> the handler's behaviour attribute, its constructor
KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    attribute, _ = KINDS[handler.request_streaming, handler.response_streaming]
    return getattr(handler, attribute)


def rewrapped(
    handler: grpc.RpcMethodHandler,
    behaviour: Behaviour,
    request_deserializer: Callable[[bytes], object] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind doing `behaviour` (and decoding with
    `request_deserializer`, when given)."""
    _, make = KINDS[handler.request_streaming, handler.response_streaming]
    return make(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def around(
    behaviour: Behaviour,
    before: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    during: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> Behaviour:
    """`behaviour` of the same style (coroutine or async generator), called with what
    `before(request, context)` returns instead of the request, inside the context manager
    `during()` makes for as long as the call runs."""

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request, context) -> AsyncIterator:
            with during():
                async for response in behaviour(await before(request, context), context):
                    yield response

        return stream

    async def call(request, context):
        with during():
            result = behaviour(await before(request, context), context)
            return await result if inspect.isawaitable(result) else result

    return call
