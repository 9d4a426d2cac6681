"""The server's capacity hint is the standard `grpc-retry-pushback-ms` trailer, so gRPC's own
retries, in any language, back off by it: a Generate refused by a full queue is retried by the
channel's `retryPolicy` (no loop in the caller) and completes once the queue has room."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from tests.api.server_process import free_port, running_server, scrape, value, wait_for_waiting

from loraserve_client import Client, ResourceExhausted
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow  # a real server process

# Without the server's pushback these five attempts would all be spent within a tenth of a
# second, long before the queue has room; the pushback spaces them a second apart.
RETRY_GENERATE = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "loraserve.v1.GenerationService", "method": "Generate"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.02s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
)


def rejected(port: int) -> float:
    return value(scrape(port), "loraserve_requests_rejected_total", reason="queue_full")


def test_a_full_queue_is_retried_by_grpc_after_the_servers_pushback(model_dirs, tmp_path):
    port = free_port()
    flags = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--max-waiting", "1",
             "--max-batch-size", "1", "--metrics-port", str(port)]  # fmt: skip
    with running_server(*flags, log_path=tmp_path / "server.log") as (address, _):
        options = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_GENERATE)]
        with (
            grpc.insecure_channel(address) as plain,
            grpc.insecure_channel(address, options) as retrying,
        ):
            stub = generation_pb2_grpc.GenerationServiceStub(plain)
            long = gpb.GenerationInput(text="hi", max_new_tokens=500, ignore_eos=True)
            running = stub.GenerateStream(gpb.GenerateStreamRequest(input=long), timeout=120)
            next(running)
            waiting = stub.Generate.future(gpb.GenerateRequest(input=long), timeout=120)
            wait_for_waiting(port, 1)  # the queue holds its one request: full

            with Client(address, timeout=30) as client, pytest.raises(ResourceExhausted) as full:
                client.generate("hi", max_new_tokens=4)  # the loraserve client never retries it
            assert full.value.retry_after == 1.0
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(gpb.GenerateRequest(input=long), timeout=30)
            trailers = dict(refused.value.trailing_metadata())
            assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"] == "1000"
            short = gpb.GenerationInput(text="hi", max_new_tokens=4, ignore_eos=True)
            retried = generation_pb2_grpc.GenerationServiceStub(retrying).Generate.future(
                gpb.GenerateRequest(input=short), timeout=120
            )
            deadline = time.monotonic() + 60
            while rejected(port) < 3:  # two refusals above, then the retried call's first
                assert time.monotonic() < deadline, "the retried call was never refused"
                time.sleep(0.02)
            running.cancel()
            waiting.cancel()
            reply = retried.result(timeout=120)
        assert reply.usage.completion_tokens == 4
        assert 3 <= rejected(port) <= 6
