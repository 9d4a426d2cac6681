"""Start a real `loraserve serve` process on a free loopback port and wait for its health;
read what its /metrics endpoint says."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to `address`: plaintext, or TLS with `credentials`."""
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def health_status(
    address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> int | None:
    """The health status, or None while nothing answers on the port."""
    with channel(address, credentials) as channel_:
        try:
            reply = health_pb2_grpc.HealthStub(channel_).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return reply.status


@contextmanager
def running_server(
    *args: str,
    log_path: Path,
    timeout: float = 120.0,
    env: dict | None = None,
    credentials: grpc.ChannelCredentials | None = None,
):
    """Yield (address, process); the process is SERVING on entry (probed over TLS with
    `credentials` when given)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, LORASERVE_LOG_LEVEL="INFO", **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout
        while health_status(address, credentials=credentials) != SERVING:
            assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not SERVING:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield address, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_waiting(port: int, count: int, timeout: float = 30.0) -> None:
    """Until the server reports `count` requests waiting (it has queued what was sent)."""
    deadline = time.monotonic() + timeout
    while value(scrape(port), "loraserve_requests_waiting") != count:
        assert time.monotonic() < deadline, f"never {count} waiting requests"
        time.sleep(0.05)
