"""What the reliability tests share: the tenants' keys and quotas, raw-stub calls, adapter
files to edit, uploads that stall."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb

WRITE = ["generate", "adapters:write"]
KEYS = {
    "alpha-key": {"tenant": "alpha", "scopes": WRITE},
    "beta-key": {"tenant": "beta", "scopes": WRITE},
    "beta-admin-key": {"tenant": "beta", "scopes": ["admin"]},
    # one tenant per kind of quota (see `quotas`), so each test meets only its own limit
    "names-key": {"tenant": "few-names", "scopes": WRITE},
    "versions-key": {"tenant": "few-versions", "scopes": WRITE},
    "bytes-key": {"tenant": "few-bytes", "scopes": WRITE},
    "streams-key": {"tenant": "few-streams", "scopes": WRITE},
    "fuzz-key": {"tenant": "fuzz", "scopes": [*WRITE, "admin"]},  # the fuzz test's own tenant
}
SHARED = "house-style"  # the shared start-up adapter (--adapter) of the package's server
IDLE_UPLOAD_S = 4.0  # its --upload-idle-timeout-seconds
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CHUNK = 1 << 20


def quotas(adapter_bytes: int) -> dict[str, dict[str, int]]:
    """The quota tenants' limits, given the size of the adapter the tests upload."""
    return {
        "few-names": {"max_adapters": 2},
        "few-versions": {"max_versions": 3},
        "few-bytes": {"max_stored_bytes": adapter_bytes * 5 // 2},
        "few-streams": {"max_requests_in_flight": 2},
    }


def keys_file(path: Path, keys: Mapping[str, dict], quota: Mapping | None = None) -> Path:
    """Write a keys file of `keys` (key -> tenant and scopes) and `quota` (tenant -> limits)."""
    entries = [{"key": key, **entry} for key, entry in keys.items()]
    path.write_text(json.dumps({"keys": entries, "quotas": dict(quota or {})}))
    return path


@dataclass(frozen=True)
class Server:
    address: str
    log: Path
    adapter: Path  # a valid rank-4 attention-only PEFT adapter for the served model
    store: Path  # the server's adapter store
    pid: int

    def staged(self) -> list[Path]:
        """What the store's staging area holds (uploads in flight)."""
        return list((self.store / ".staging").iterdir())

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()


def metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def with_config(files: Mapping[str, bytes], change: Callable[[dict], object]) -> dict[str, bytes]:
    """`files` with adapter_config.json edited in place by `change`."""
    config = json.loads(files[CONFIG])
    change(config)
    return {**files, CONFIG: json.dumps(config).encode()}


def upload_requests(
    name: str, files: Mapping[str, bytes], version: str = ""
) -> Iterator[apb.UploadAdapterRequest]:
    header = apb.UploadHeader(
        name=name,
        version=version,
        files=[
            apb.AdapterFile(
                filename=f, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
            )
            for f, data in files.items()
        ],
    )
    yield apb.UploadAdapterRequest(header=header)
    for f, data in files.items():
        for start in range(0, len(data), CHUNK):
            yield apb.UploadAdapterRequest(
                chunk=apb.FileChunk(filename=f, data=data[start : start + CHUNK])
            )


def held(messages: Iterator, send: int, release: threading.Event) -> Iterator:
    """The first `send` of `messages`, then the rest once `release` is set (a stalled client)."""
    for i, message in enumerate(messages):
        if i == send and not release.wait(300):
            return
        yield message


def upload(
    server: Server,
    key: str,
    name: str,
    files: Mapping[str, bytes],
    timeout: float = 120,
    version: str = "",
) -> apb.UploadAdapterResponse:
    """UploadAdapter over a fresh channel; raises grpc.RpcError when refused."""
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        return stub.UploadAdapter(
            upload_requests(name, files, version), metadata=metadata(key), timeout=timeout
        )


def refusal(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.RpcError:
    """The grpc.RpcError `call(*args, **kwargs)` raises (it must raise one)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call was accepted")


def health_latency(channel: grpc.Channel) -> float:
    """Seconds one health Check takes; it must answer SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    started = time.perf_counter()
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    elapsed = time.perf_counter() - started
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return elapsed


def generation(
    text: str, adapter: str = "", max_new_tokens: int = 8, **sampling
) -> gpb.GenerationInput:
    return gpb.GenerationInput(
        text=text,
        adapter=gpb.AdapterRef(name=adapter),
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        sampling=gpb.SamplingParams(**sampling),
    )


@dataclass
class Stream:
    """A GenerateStream read to its end on the caller's thread: token arrival times, the error."""

    arrivals: list[float] = field(default_factory=list)
    error: grpc.RpcError | None = None
    finished: bool = False

    def gaps(self, after: float = 0.0, before: float = float("inf")) -> list[float]:
        """Seconds between consecutive tokens, for tokens that arrived in (after, before]."""
        pairs = zip(self.arrivals, self.arrivals[1:])
        return [b - a for a, b in pairs if after < b <= before]


def read_stream(server: Server, key: str, message: gpb.GenerationInput, into: Stream) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        call = stub.GenerateStream(
            gpb.GenerateStreamRequest(input=message), metadata=metadata(key), timeout=300
        )
        try:
            for event in call:
                if event.HasField("token"):
                    into.arrivals.append(time.perf_counter())
                else:
                    into.finished = True
        except grpc.RpcError as error:
            into.error = error
