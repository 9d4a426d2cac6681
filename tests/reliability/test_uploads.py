"""Promises about the upload stream itself: one that stops sending is aborted after the idle
timeout and leaves no staging folder behind; a version that exists is ALREADY_EXISTS and is
left as it was."""

from __future__ import annotations

import threading
import time

import grpc
from tests.reliability.helpers import (
    IDLE_UPLOAD_S,
    adapter_files,
    held,
    metadata,
    refusal,
    upload,
    upload_requests,
)

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc

STALLED = 20


def test_uploads_that_stop_sending_are_aborted_and_leave_nothing(server):
    files = adapter_files(server.adapter)
    release = threading.Event()
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        started = time.monotonic()
        calls = [  # half send only the header, half a first chunk too
            stub.UploadAdapter.future(
                held(upload_requests(f"stalled-{i}", files), 1 + i % 2, release),
                metadata=metadata("alpha-key"),
                timeout=120,
            )
            for i in range(STALLED)
        ]
        try:
            most_staged = 0
            while not any(call.done() for call in calls) and most_staged < STALLED:
                most_staged = max(most_staged, len(server.staged()))
                time.sleep(0.01)
            errors = [call.exception(timeout=60) for call in calls]
        finally:
            release.set()
        elapsed = time.monotonic() - started
    print(f"figure: {STALLED} stalled uploads aborted after {elapsed:.1f} s")
    assert most_staged == STALLED  # each held a staging folder while it waited
    for error in errors:
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert f"no upload message for {IDLE_UPLOAD_S:g} s" in error.details()
    assert IDLE_UPLOAD_S <= elapsed < 60  # the server's timeout, not the client's deadline
    assert server.staged() == []
    assert upload(server, "alpha-key", "after-stalls", files).adapter.version == "1"


def test_uploading_an_existing_version_is_already_exists(server):
    files = adapter_files(server.adapter)
    first = upload(server, "alpha-key", "fixed", files, version="2026-11")
    for again in (files, {**files, "adapter_config.json": files["adapter_config.json"] + b" "}):
        error = refusal(upload, server, "alpha-key", "fixed", again, version="2026-11")
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
        assert "fixed@2026-11 already exists" in error.details()
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        got = stub.GetAdapter(
            apb.GetAdapterRequest(name="fixed", version="2026-11"),
            metadata=metadata("alpha-key"),
            timeout=30,
        )
    assert got.adapter.files == first.adapter.files  # untouched
    assert server.staged() == []
