"""`loraserve adapters import` publishes a PEFT directory offline; a server then serves it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from tests.api.server_process import running_server

from loraserve_client import Client

pytestmark = pytest.mark.slow  # a real server process


def loraserve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loraserve.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_import_then_serve(model_dirs, adapter_dirs, tmp_path):
    store = tmp_path / "store"
    common = ["--adapter-dir", str(store), "--model", str(model_dirs["llama"])]
    source = adapter_dirs["llama"]["r8-all"]
    done = loraserve("adapters", "import", str(source), "--tenant", "default", "--name", "sql",
                     *common)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "default/sql@1" in done.stdout
    assert (store / "default" / "sql" / "versions" / "1" / "manifest.json").is_file()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(source / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refused = loraserve("adapters", "import", str(pickled), "--tenant", "default", "--name", "p",
                        *common)  # fmt: skip
    assert refused.returncode == 1 and "safetensors" in refused.stderr
    assert not (store / "default" / "p").exists()

    flags = [*common, "--device", "cpu"]
    with (
        running_server(*flags, log_path=tmp_path / "server.log") as (address, _),
        Client(address) as client,
    ):
        listed = client.list_adapters()
        assert [(a.name, a.version) for a in listed] == [("sql", "1")]
        with_adapter = client.generate("hello", adapter="sql", max_new_tokens=6)
        base = client.generate("hello", max_new_tokens=6)
    assert with_adapter.completion_tokens == 6
    assert with_adapter.token_ids != base.token_ids
