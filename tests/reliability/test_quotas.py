"""Promise: a tenant's quota (in the keys file) caps what it stores and runs, with
RESOURCE_EXHAUSTED naming the limit; other tenants are not affected. One tenant per kind of
quota (see `helpers.quotas`), so each test meets only its own limit."""

from __future__ import annotations

import threading
import time

import grpc
from tests.reliability.helpers import (
    IDLE_UPLOAD_S,
    adapter_files,
    generation,
    held,
    metadata,
    refusal,
    upload,
    upload_requests,
)

from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def assert_over_quota(error: grpc.RpcError, limit: str) -> None:
    assert error.code() == EXHAUSTED, error
    assert limit in error.details() and "delete" in error.details(), error.details()
    trailers = dict(error.trailing_metadata() or ())
    assert "retry-after-ms" not in trailers  # only a delete makes room: no retry hint


def test_max_adapters_refuses_a_new_name_but_not_a_new_version(server):
    files = adapter_files(server.adapter)
    for name in ("one", "two"):
        upload(server, "names-key", name, files)
    error = refusal(lambda: upload(server, "names-key", "three", files))
    assert_over_quota(error, "max_adapters")
    assert upload(server, "names-key", "one", files).adapter.version == "2"
    assert upload(server, "alpha-key", "three", files).adapter.tenant == "alpha"
    assert server.staged() == []


def test_max_versions_counts_every_version_of_every_adapter(server):
    files = adapter_files(server.adapter)
    for name in ("one", "one", "two"):
        upload(server, "versions-key", name, files)
    error = refusal(lambda: upload(server, "versions-key", "one", files))
    assert_over_quota(error, "max_versions")
    assert_over_quota(refusal(lambda: upload(server, "versions-key", "new", files)), "max_versions")


def test_max_stored_bytes_refuses_before_the_bytes_arrive(server):
    files = adapter_files(server.adapter)
    for name in ("one", "two"):  # the quota is 2.5 adapters' bytes
        upload(server, "bytes-key", name, files)
    release = threading.Event()
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        header_only = held(upload_requests("three", files), 1, release)
        call = stub.UploadAdapter.future(header_only, metadata=metadata("bytes-key"), timeout=60)
        try:
            error = call.exception(timeout=IDLE_UPLOAD_S / 2)  # refused on the header alone
        finally:
            release.set()
    assert error is not None
    assert_over_quota(error, "max_stored_bytes")
    assert "this upload's" in error.details()
    assert server.staged() == []


def test_max_requests_in_flight_refuses_the_extra_call_only(server):
    long = generation("Hold", max_new_tokens=2000)
    short = generation("One more", max_new_tokens=4)
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def unary(key: str) -> gpb.GenerateResponse:
            request = gpb.GenerateRequest(input=short)
            return stub.Generate(request, metadata=metadata(key), timeout=60)

        def streamed(key: str) -> list:
            request = gpb.GenerateStreamRequest(input=short)
            return list(stub.GenerateStream(request, metadata=metadata(key), timeout=60))

        held = [
            stub.GenerateStream(
                gpb.GenerateStreamRequest(input=long), metadata=metadata("streams-key"), timeout=120
            )
            for _ in range(2)
        ]
        for call in held:
            next(call)  # both are in flight
        for attempt in (unary, streamed):
            error = refusal(attempt, "streams-key")
            assert error.code() == EXHAUSTED, error
            assert "max_requests_in_flight" in error.details()
            assert dict(error.trailing_metadata())["retry-after-ms"] == "1000"
        assert unary("alpha-key").usage.completion_tokens == 4  # another tenant: unaffected
        held[0].cancel()
        deadline = time.monotonic() + 30
        while True:  # the cancelled call's place comes back once the server has ended it
            try:
                reply = unary("streams-key")
                break
            except grpc.RpcError as error:
                assert error.code() == EXHAUSTED and time.monotonic() < deadline, error
                time.sleep(0.05)
        assert reply.usage.completion_tokens == 4
        held[1].cancel()
