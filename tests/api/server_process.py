"""Start a real `loraserve serve` process on a free loopback port and wait for its health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "") -> int | None:
    """The health status, or None while nothing answers on the port."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return reply.status


@contextmanager
def running_server(*args: str, log_path: Path, timeout: float = 120.0, env: dict | None = None):
    """Yield (address, process, seen health statuses); the process is SERVING on entry."""
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
    seen: list[int | None] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            status = health_status(address)
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == SERVING:
                break
            assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not SERVING:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield address, process, seen
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
