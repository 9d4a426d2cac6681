"""Importing the server's modules, the benchmark scripts or the tests' own asks the Hugging Face
Hub for nothing: bitsandbytes, which on a CPU with AVX512-BF16 asks it for a kernel at import, is
imported through `loraserve.model.bitsandbytes_offline`. Each import runs in a fresh interpreter
whose Hub is a local listener that counts the connections it gets; plain `import bitsandbytes`
beside them shows that the listener sees the request when it is made."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[FakeHub]:
    listener = socket.create_server(("127.0.0.1", 0))
    hub = FakeHub(listener)
    thread = threading.Thread(target=hub.serve, daemon=True)
    thread.start()
    yield hub
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join()


@pytest.fixture(scope="module")
def plain_import_asks(fake_hub: FakeHub) -> bool:
    """Whether this CPU's bitsandbytes asks for a kernel at import; where it does, plain `import
    bitsandbytes` shows that the fake Hub sees the request (once for the module's imports)."""
    plain = run_python(ASKS_THE_HUB, fake_hub)
    if plain.stdout.strip() != "True":
        return False
    assert fake_hub.take_count() > 0, "plain `import bitsandbytes` should have asked the fake Hub"
    return True


ROOT = Path(__file__).resolve().parents[2]
# what the benchmark scripts and the tests' own modules import as top-level modules
SCRIPT_FOLDERS = (ROOT / "benchmarks", ROOT / "tests")
GUARD = "loraserve.model.bitsandbytes_offline"
IMPORT_BITSANDBYTES = {"bitsandbytes", "peft", "transformers"}  # peft imports bitsandbytes


def run_python(code: str, hub: FakeHub) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [*map(str, SCRIPT_FOLDERS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
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
        "bench_multi_lora",  # benchmarks/: transformers, peft and bitsandbytes directly
        "profile_step",
        "conftest",  # the tests' own, which builds PEFT models
    ],
)
def test_importing_asks_the_hub_for_nothing(
    fake_hub: FakeHub, plain_import_asks: bool, module: str
) -> None:
    if not plain_import_asks:
        pytest.skip("bitsandbytes asks the Hub for a kernel only on CPUs with AVX512-BF16")

    guarded = run_python(f"import {module}\n{ASKS_THE_HUB}", fake_hub)

    assert fake_hub.take_count() == 0
    assert "kernels-community" not in guarded.stderr  # nor bitsandbytes' warning about it


def top_level_imports(path: Path) -> list[str]:
    """The modules `path` imports at its top level, in order."""
    names: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", SCRIPT_FOLDERS, ids=lambda folder: folder.name)
def test_scripts_import_bitsandbytes_offline_before_what_imports_it(folder: Path) -> None:
    """Each benchmark script (and the tests' conftest) runs on its own, so each that imports
    bitsandbytes, peft or transformers imports the guard first."""
    unguarded = []
    for path in sorted(folder.glob("*.py")):
        names = top_level_imports(path)
        first = next(
            (i for i, n in enumerate(names) if n.split(".")[0] in IMPORT_BITSANDBYTES), None
        )
        if first is not None and GUARD not in names[:first]:
            unguarded.append(path.name)
    assert unguarded == []
