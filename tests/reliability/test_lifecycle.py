"""Promises about the operator's side, against one server of this module's own (bound to every
address, without TLS, a batch of one and a queue of three): /metrics binds loopback and names
no tenant or adapter; the cleartext warning; the queue refuses exactly its overflow; SIGHUP
reloads the keys without dropping a call; SIGTERM keeps the listener open, NOT_SERVING, until
the calls in flight have finished, then exits 0. The drain test ends the server: it runs last.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from tests.api.server_process import free_port, health_status, running_server
from tests.reliability.helpers import (
    KEYS,
    adapter_files,
    generation,
    held,
    keys_file,
    metadata,
    refusal,
    upload_requests,
)

from loraserve_client import Client
from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb

pytestmark = pytest.mark.slow  # a server process of its own
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
QUEUE = 3
OVERFLOW = 4


@dataclass(frozen=True)
class Operated:
    address: str
    port: int  # the gRPC port, bound to every address
    metrics_port: int
    process: subprocess.Popen
    keys: Path
    log: Path
    store: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def operated(model_dirs, tmp_path_factory) -> Iterator[Operated]:
    root = tmp_path_factory.mktemp("lifecycle")
    keys = keys_file(root / "keys.json", KEYS)
    metrics_port = free_port()
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--host", "0.0.0.0",
        "--metrics-port", str(metrics_port), "--max-batch-size", "1",
        "--max-waiting", str(QUEUE), "--drain-grace-seconds", "120",
    ]  # fmt: skip
    log = root / "server.log"
    with running_server(*flags, log_path=log) as (address, process):
        port = int(address.rsplit(":", 1)[1])
        yield Operated(address, port, metrics_port, process, keys, log, root / "store")


def stub(channel: grpc.Channel) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(channel)


def long_stream(channel: grpc.Channel, key: str, tokens: int, adapter: str = ""):
    """A GenerateStream call, returned once its first token arrived (it is running)."""
    request = gpb.GenerateStreamRequest(input=generation("Long", adapter, tokens))
    call = stub(channel).GenerateStream(request, metadata=metadata(key), timeout=300)
    assert next(call).HasField("token")
    return call


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def test_metrics_listen_on_loopback_and_name_no_tenant_or_adapter(operated, adapter_dirs):
    assert "API keys will travel in cleartext: bound to 0.0.0.0" in operated.log_text()
    # the control: the gRPC port, bound to every address, answers on 127.0.0.2 ...
    assert health_status(f"127.0.0.2:{operated.port}") == SERVING
    with pytest.raises(urllib.error.URLError):  # ... and /metrics, bound to 127.0.0.1, not
        scrape("127.0.0.2", operated.metrics_port)
    with Client(operated.address, "alpha-key") as alpha:
        alpha.upload_adapter(adapter_dirs["llama"]["r4-attn"], "private-name", progress=False)
    with grpc.insecure_channel(operated.address) as channel:
        call = long_stream(channel, "alpha-key", 2000, "private-name")
        text = scrape("127.0.0.1", operated.metrics_port)
        call.cancel()
    assert 'running_lora_adapters=""' in text  # the gateway gauge, with names kept out
    assert 'loraserve_requests_received_total{tenant=""}' in text
    for secret in ("alpha", "beta", "private-name"):
        assert secret not in text


def test_a_full_queue_refuses_exactly_the_overflow(operated):
    with grpc.insecure_channel(operated.address) as channel:
        running = long_stream(channel, "alpha-key", 2000)  # holds the batch of one
        request = gpb.GenerateRequest(input=generation("Queued", max_new_tokens=3))
        calls = [
            stub(channel).Generate.future(request, metadata=metadata("beta-key"), timeout=300)
            for _ in range(QUEUE + OVERFLOW)
        ]
        deadline = time.monotonic() + 60
        while sum(call.done() for call in calls) < OVERFLOW:
            assert time.monotonic() < deadline, "the overflow was never refused"
            time.sleep(0.01)
        refused = [call for call in calls if call.done()]
        assert len(refused) == OVERFLOW and running.is_active()
        for call in refused:
            error = call.exception()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "queue is full" in error.details()
            assert dict(error.trailing_metadata())["retry-after-ms"] == "1000"
            retry = error_details_pb2.RetryInfo()
            assert rpc_status.from_call(error).details[0].Unpack(retry)
            assert retry.retry_delay.seconds == 1
        running.cancel()
        queued = [call.result(timeout=120) for call in calls if call not in refused]
    assert [reply.usage.completion_tokens for reply in queued] == [3] * QUEUE


def test_sighup_reloads_the_keys_without_dropping_a_call(operated):
    keys = {**KEYS, "gamma-key": {"tenant": "gamma", "scopes": ["generate"]}}
    del keys["beta-key"]
    with grpc.insecure_channel(operated.address) as channel:
        in_flight = long_stream(channel, "alpha-key", 300)
        reloads = operated.log_text().count("API keys reloaded")
        keys_file(operated.keys, keys)
        operated.process.send_signal(signal.SIGHUP)
        wait_for_log(operated, "API keys reloaded", reloads + 1)
        short = gpb.GenerateRequest(input=generation("New key", max_new_tokens=3))
        reply = stub(channel).Generate(short, metadata=metadata("gamma-key"), timeout=120)
        assert reply.usage.completion_tokens == 3
        removed = refusal(lambda: stub(channel).Generate(short, metadata=metadata("beta-key")))
        assert removed.code() == grpc.StatusCode.UNAUTHENTICATED
        events = list(in_flight)
        assert events[-1].HasField("final") and events[-1].final.usage.completion_tokens == 300

        failures = operated.log_text().count("API keys not reloaded")
        operated.keys.write_text('{"keys": [{"key": "k", "tenant": "../evil"}]}')
        operated.process.send_signal(signal.SIGHUP)
        wait_for_log(operated, "API keys not reloaded", failures + 1)
        assert "not a valid tenant name" in operated.log_text()
        reply = stub(channel).Generate(short, metadata=metadata("gamma-key"), timeout=120)
        assert reply.usage.completion_tokens == 3  # the keys in use stayed
    assert "gamma-key" not in operated.log_text()  # keys are never logged


def test_sigterm_drains_with_the_listener_open_and_exits_zero(operated, adapter_dirs):
    files = adapter_files(adapter_dirs["llama"]["r4-attn"])
    late = gpb.GenerateRequest(input=generation("Too late"))
    release = threading.Event()
    with grpc.insecure_channel(operated.address) as channel:
        stream = long_stream(channel, "alpha-key", 300)
        uploading = adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter.future(
            held(upload_requests("during-drain", files), 2, release),
            metadata=metadata("alpha-key"),
            timeout=300,
        )
        try:
            deadline = time.monotonic() + 60
            while not any((operated.store / ".staging").iterdir()):  # the server holds it
                assert time.monotonic() < deadline, "the upload never reached the server"
                time.sleep(0.02)
            operated.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while (status := health_status(operated.address)) == SERVING:
                assert time.monotonic() < deadline, "health never left SERVING"
                time.sleep(0.02)
            assert status == NOT_SERVING  # answered: the listener is still open
            assert health_status(operated.address) == NOT_SERVING
            new = refusal(lambda: stub(channel).Generate(late, metadata=metadata("alpha-key")))
            assert new.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in new.details()
            assert not uploading.done()  # in flight, held by this client
        finally:
            release.set()
        assert uploading.result(timeout=120).adapter.name == "during-drain"
        events = list(stream)
    assert events[-1].HasField("final") and events[-1].final.usage.completion_tokens == 300
    assert operated.process.wait(timeout=120) == 0


def wait_for_log(operated: Operated, words: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while operated.log_text().count(words) < count:
        assert time.monotonic() < deadline, f"never logged {words!r}"
        time.sleep(0.02)
