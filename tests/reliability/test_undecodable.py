"""Promise: a request whose bytes do not decode gets INVALID_ARGUMENT with a short message on
every RPC, and the server logs at most one line for a burst of them (grpc's default is UNKNOWN
and two ERROR lines per call)."""

from __future__ import annotations

import grpc
import pytest
from tests.reliability.helpers import metadata, refusal

GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no protobuf message parses from it
METHODS = {
    # method: (request streaming, response streaming)
    "/loraserve.v1.GenerationService/Generate": (False, False),
    "/loraserve.v1.GenerationService/GenerateStream": (False, True),
    "/loraserve.v1.ServerService/GetServerInfo": (False, False),
    "/loraserve.v1.AdapterService/UploadAdapter": (True, False),
    "/loraserve.v1.AdapterService/ListAdapters": (False, False),
    "/loraserve.v1.AdapterService/GetAdapter": (False, False),
    "/loraserve.v1.AdapterService/DeleteAdapter": (False, False),
    "/grpc.health.v1.Health/Check": (False, False),
    "/grpc.health.v1.Health/Watch": (False, True),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (True, True),
}
ROUNDS = 20  # calls per method


def call_raw(channel: grpc.Channel, method: str, key: str | None) -> None:
    request_streaming, response_streaming = METHODS[method]
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[request_streaming, response_streaming](method)
    request = iter([GARBAGE]) if request_streaming else GARBAGE
    reply = kind(request, metadata=metadata(key) if key else None, timeout=30)
    if response_streaming:
        list(reply)


@pytest.mark.parametrize("method", list(METHODS))
def test_undecodable_bytes_are_invalid_argument_with_one_log_line(server, method):
    logged_from = server.log_size()
    with grpc.insecure_channel(server.address) as channel:
        for _ in range(ROUNDS):
            error = refusal(lambda: call_raw(channel, method, "alpha-key"))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            details = error.details()
            assert "do not decode" in details and method in details
            assert len(details) < 200
            assert not any(word in details for word in ("Error", "Exception", "Traceback"))
        if not method.startswith("/grpc."):  # no key: refused as unauthenticated, not parsed
            error = refusal(lambda: call_raw(channel, method, None))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = server.log_since(logged_from)
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines
    assert len([line for line in lines if "undecodable" in line]) <= 1, lines
