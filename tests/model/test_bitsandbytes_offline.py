"""Importing the server's modules asks the Hugging Face Hub for nothing: bitsandbytes, which on a
CPU with AVX512-BF16 asks it for a kernel at import, is imported through
`loraserve.model.bitsandbytes_offline`. Each import runs in a fresh interpreter whose Hub is a
local listener that counts the connections it gets; plain `import bitsandbytes` beside them shows
that the listener sees the request when it is made."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

pytestmark = pytest.mark.slow

ASKS_THE_HUB = """
from bitsandbytes.functional import has_avx512bf16
print(bool(has_avx512bf16()))  # the native check returns an int
"""


@dataclass
class FakeHub:
    """A listener on loopback that accepts connections and closes them at once."""

    listener: socket.socket
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        host, port = self.listener.getsockname()
        return f"http://{host}:{port}"

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with self._lock:
                self.connections += 1
            connection.close()

    def take_count(self) -> int:
        with self._lock:
            count, self.connections = self.connections, 0
        return count


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    listener = socket.create_server(("127.0.0.1", 0))
    hub = FakeHub(listener)
    thread = threading.Thread(target=hub.serve, daemon=True)
    thread.start()
    yield hub
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join()


def run_python(code: str, hub: FakeHub) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    "module",
    [
        "loraserve.app",  # what `loraserve serve` imports
        "loraserve.demo",  # the default model's training, whose peft imports bitsandbytes
        "loraserve.model.slot_terms",
    ],
)
def test_importing_the_server_asks_the_hub_for_nothing(fake_hub: FakeHub, module: str) -> None:
    plain = run_python(ASKS_THE_HUB, fake_hub)
    if plain.stdout.strip() != "True":
        pytest.skip("bitsandbytes asks the Hub for a kernel only on CPUs with AVX512-BF16")
    assert fake_hub.take_count() > 0, "plain `import bitsandbytes` should have asked the fake Hub"

    guarded = run_python(f"import {module}\n{ASKS_THE_HUB}", fake_hub)

    assert fake_hub.take_count() == 0
    assert "kernels-community" not in guarded.stderr  # nor bitsandbytes' warning about it
