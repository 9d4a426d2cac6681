"""A real Prometheus server for tests: Debian's `prometheus` (installed by the README's set-up)
on a loopback port with a throwaway database, queried over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tests.api.server_process import free_port


class Prometheus:
    """A running server's query API."""

    def __init__(self, port: int) -> None:
        self.port = port

    def value(self, promql: str) -> float | None:
        """The first series' value of an instant query, None when it returns none (or the
        server is not up yet)."""
        query = urllib.parse.urlencode({"query": promql})
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{query}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                result = json.load(reply)["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, want: float, seconds: float = 90) -> float | None:
        """The query's value once it equals `want` (scrapes come every few seconds), or the
        last value seen when `seconds` pass first."""
        deadline = time.monotonic() + seconds
        got = self.value(promql)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.5)
            got = self.value(promql)
        return got


@contextmanager
def running_prometheus(config: Path, data: Path) -> Iterator[Prometheus]:
    """Prometheus with `config`, its database under `data`, stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: the README's set-up installs Debian's prometheus")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Prometheus(port)
    finally:
        process.terminate()
        process.wait(timeout=30)
