"""Request messages whose bytes do not decode: INVALID_ARGUMENT with a short message.

Left alone, grpc answers a message its deserializer cannot parse with UNKNOWN and logs two
ERROR lines per call. `DecodingInterceptor` wraps every method handler's request deserializer
so that a parse failure yields a marker instead of raising, and wraps the handler's behaviour so
that the call ends with INVALID_ARGUMENT when the marker arrives (for a streaming request, at
the message that failed, before the servicer sees it). Failures are counted in
`loraserve_requests_rejected_total{reason="undecodable"}` and logged at most once per
`LOG_INTERVAL_S`, with the number held back.

Knows nothing about what the methods do; it keeps each handler's streaming kind and style.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from loraserve.api.handlers import around, behaviour_of, rewrapped
from loraserve.metrics import Metrics

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


UNDECODABLE = _Undecodable()


class ThrottledLog:
    """At most one warning per `interval_s`; the next one says how many were held back."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next_at = 0.0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return
        held, self._held, self._next_at = self._held, 0, now + self.interval_s
        log.warning(message + " (%d more since the last report)", *args, held)


def _refusal(method: str) -> str:
    return f"the request bytes do not decode as the request message of {method}"


async def _checked(requests: AsyncIterator, context, method: str) -> AsyncIterator:
    """The messages of a streaming request, ending the call at the first undecodable one."""
    async for request in requests:
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method))
        yield request


def _admission(streaming_request: bool, method: str):
    """What the handler gets instead of its request: the request, refused when undecodable."""

    async def admit(request, context):
        if streaming_request:
            return _checked(request, context, method)
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(method))
        return request

    return admit


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.log = ThrottledLog()

    def _decoder(self, method: str, deserializer: Callable[[bytes], object]):
        def decode(data: bytes) -> object:
            try:
                return deserializer(data)
            except Exception:  # any parse failure: the call is refused, not crashed
                self.metrics.requests_rejected.labels("undecodable").inc()
                self.log.warning("refused undecodable request messages, latest for %s", method)
                return UNDECODABLE

        return decode

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return rewrapped(
            handler,
            around(behaviour_of(handler), _admission(handler.request_streaming, details.method)),
            self._decoder(details.method, handler.request_deserializer),
        )
