"""In-process fake loraserve services on a real loopback gRPC port.

They stand in for the real server where a client test needs what it shows only rarely or
slowly (UNAVAILABLE for the first calls, RESOURCE_EXHAUSTED with a retry hint, an upload kept
byte for byte), and record the metadata and the deadline every call arrived with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve_client.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)


@dataclass
class Call:
    method: str
    metadata: dict[str, str]
    # Seconds left before the call's deadline when it arrived (None: no deadline).
    time_remaining: float | None


@dataclass
class Behaviour:
    # Health checks answered UNAVAILABLE before the first SERVING.
    health_failures: int = 0
    # (code, details, trailing metadata) with which Generate fails; None answers normally.
    generate_error: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
    calls: list[Call] = field(default_factory=list)
    # The input of every Generate and GenerateStream call, in order.
    inputs: list[generation_pb2.GenerationInput] = field(default_factory=list)
    adapters: dict[tuple[str, str], adapters_pb2.Adapter] = field(default_factory=dict)
    # Reassembled uploads: (name, version) -> filename -> bytes.
    uploads: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)

    def record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata = {m.key: m.value for m in context.invocation_metadata()}
        self.calls.append(Call(method, metadata, context.time_remaining()))

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]


class FakeHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def Check(self, request, context):
        self.b.record("Check", context)
        if self.b.health_failures > 0:
            self.b.health_failures -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def Generate(self, request, context):
        self.b.record("Generate", context)
        self.b.inputs.append(request.input)
        if self.b.generate_error is not None:
            code, details, trailing = self.b.generate_error
            context.set_trailing_metadata(trailing)
            context.abort(code, details)
        return generation_pb2.GenerateResponse(
            text="hi", token_ids=[1], finish_reason=generation_pb2.FINISH_REASON_LENGTH
        )

    def GenerateStream(self, request, context):
        self.b.record("GenerateStream", context)
        self.b.inputs.append(request.input)
        yield generation_pb2.GenerateStreamResponse(token=generation_pb2.TokenEvent(token_id=1))
        yield generation_pb2.GenerateStreamResponse(
            final=generation_pb2.FinalEvent(finish_reason=generation_pb2.FINISH_REASON_EOS)
        )


class FakeServerInfo(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def GetServerInfo(self, request, context):
        self.b.record("GetServerInfo", context)
        return server_pb2.GetServerInfoResponse(base_model="fake", max_rank=64)


class FakeAdapters(adapters_pb2_grpc.AdapterServiceServicer):
    """Keeps adapters in memory; checks each upload's bytes against its header."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    def _versions(self, name: str) -> list[str]:
        return sorted((v for n, v in self.b.adapters if n == name), key=int)

    def UploadAdapter(self, request_iterator, context):
        self.b.record("UploadAdapter", context)
        header = next(request_iterator).header
        data = {f.filename: b"" for f in header.files}
        for request in request_iterator:
            if len(request.chunk.data) > 1 << 20:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk over 1 MiB")
            data[request.chunk.filename] += request.chunk.data
        for f in header.files:
            if hashlib.sha256(data[f.filename]).hexdigest() != f.sha256:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{f.filename}: sha256 differs")
            if len(data[f.filename]) != f.size_bytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{f.filename}: size differs")
        version = header.version or str(len(self._versions(header.name)) + 1)
        adapter = adapters_pb2.Adapter(
            name=header.name,
            version=version,
            rank=4,
            target_modules=["q_proj", "v_proj"],
            files=header.files,
            residency=adapters_pb2.RESIDENCY_DISK,
        )
        adapter.create_time.GetCurrentTime()
        self.b.adapters[header.name, version] = adapter
        self.b.uploads[header.name, version] = data
        return adapters_pb2.UploadAdapterResponse(adapter=adapter)

    def ListAdapters(self, request, context):
        self.b.record("ListAdapters", context)
        ordered = [self.b.adapters[key] for key in sorted(self.b.adapters)]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return adapters_pb2.ListAdaptersResponse(
            adapters=ordered[start:end], next_page_token=str(end) if end < len(ordered) else ""
        )

    def GetAdapter(self, request, context):
        self.b.record("GetAdapter", context)
        versions = self._versions(request.name)
        version = request.version or (versions[-1] if versions else "")
        if (request.name, version) not in self.b.adapters:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.name!r} not found")
        return adapters_pb2.GetAdapterResponse(adapter=self.b.adapters[request.name, version])

    def DeleteAdapter(self, request, context):
        self.b.record("DeleteAdapter", context)
        versions = [request.version] if request.version else self._versions(request.name)
        deleted = [v for v in versions if self.b.adapters.pop((request.name, v), None)]
        return adapters_pb2.DeleteAdapterResponse(deleted_versions=deleted)

    def PrefetchAdapter(self, request, context):
        self.b.record("PrefetchAdapter", context)
        return adapters_pb2.PrefetchAdapterResponse(residency=adapters_pb2.RESIDENCY_DEVICE)

    def PinAdapter(self, request, context):
        self.b.record("PinAdapter", context)
        return adapters_pb2.PinAdapterResponse(pinned=request.pinned)


def write_adapter_dir(directory: Path, weights: bytes) -> Path:
    """A directory with the two files an upload sends (their contents are not checked here)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


@contextmanager
def fake_server(behaviour: Behaviour) -> Iterator[str]:
    """Serve the fakes on a free loopback port; yields the address."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(FakeHealth(behaviour), server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(FakeGeneration(behaviour), server)
    server_pb2_grpc.add_ServerServiceServicer_to_server(FakeServerInfo(behaviour), server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(FakeAdapters(behaviour), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
