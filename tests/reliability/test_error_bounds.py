"""Promise: an error is small whatever caused it. An adapter with 200,000 tensors that are not
LoRA weights is refused quickly with its first problems and a count of the rest (it used to
produce a 9.5 MB message no client could receive), and a 10 KB name comes back cut short."""

from __future__ import annotations

import json
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tests.reliability.helpers import (
    WEIGHTS,
    adapter_files,
    generation,
    metadata,
    refusal,
    upload,
)

from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

TENSORS = 200_000
TRAILER_LIMIT = 8192  # grpc's default limit on the metadata a client accepts


def many_tensors(count: int) -> bytes:
    """A valid safetensors file of `count` one-float tensors, none of them a LoRA weight."""
    entries = {
        f"model.layers.0.extra_{i}.weight": {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [4 * i, 4 * i + 4],
        }
        for i in range(count)
    }
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(4 * count)


def trailer_bytes(error: grpc.RpcError) -> int:
    return sum(len(k) + len(v) for k, v in error.trailing_metadata()) + len(error.details())


def test_200000_bad_tensors_give_a_small_message_fast(server):
    files = {**adapter_files(server.adapter), WEIGHTS: many_tensors(TENSORS)}
    started = time.perf_counter()
    error = refusal(lambda: upload(server, "alpha-key", "many-tensors", files))
    elapsed = time.perf_counter() - started

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    details = error.details()
    assert "'model.layers.0.extra_0.weight' is not a LoRA A/B weight" in details
    assert f"and {TENSORS + 1 - 10} more" in details  # every tensor, and "no LoRA tensors"
    assert len(details) < 2500 and trailer_bytes(error) < TRAILER_LIMIT
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad_request)
    assert 1 <= len(bad_request.field_violations) <= 10
    assert elapsed < 10, f"refusing took {elapsed:.1f}s"


def test_a_10kb_name_is_echoed_cut_short(server):
    name = "n" * 10_000
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = gpb.GenerateRequest(input=generation("hello", adapter=name))
        error = refusal(lambda: stub.Generate(request, metadata=metadata("beta-key")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "nnnnnnnnnn" in error.details() and "(10000 long)" in error.details()
    assert len(error.details()) < 300

    error = refusal(lambda: upload(server, "beta-key", name, adapter_files(server.adapter)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert len(error.details()) < 300
