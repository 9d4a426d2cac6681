"""Promise: nesting a tenant controls is bounded before anything recurses into it. A deeply
nested safetensors header and a deeply nested page_token are INVALID_ARGUMENT with a short
message (they used to raise RecursionError, UNKNOWN with the class name)."""

from __future__ import annotations

import base64

import grpc
import pytest
from tests.reliability.helpers import WEIGHTS, adapter_files, metadata, refusal, upload

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc

DEPTH = 100_000


def nested_header(depth: int) -> bytes:
    header = b'{"t": ' + b"[" * depth + b"]" * depth + b"}"
    return len(header).to_bytes(8, "little") + header


def test_a_deeply_nested_safetensors_header_is_invalid_argument(server):
    files = {**adapter_files(server.adapter), WEIGHTS: nested_header(DEPTH)}
    error = refusal(lambda: upload(server, "alpha-key", "nested-header", files))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"{WEIGHTS}: header is nested too deeply" in error.details()
    assert "Recursion" not in error.details() and len(error.details()) < 500


@pytest.mark.parametrize("depth", [380, DEPTH])  # under and over the token length cap
def test_a_deeply_nested_page_token_is_invalid_argument(server, depth):
    token = base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode()
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        request = apb.ListAdaptersRequest(page_token=token)
        error = refusal(lambda: stub.ListAdapters(request, metadata=metadata("alpha-key")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == "page_token is not one this server issued"
