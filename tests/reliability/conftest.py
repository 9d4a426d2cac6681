"""One real `loraserve serve` process for the reliability suite: tenants with API keys (two
unlimited, one per kind of quota), the tiny llama on the CPU, its own adapter store, one shared
start-up adapter and a short upload idle timeout."""

from __future__ import annotations

import pytest
from tests.api.server_process import running_server
from tests.reliability.helpers import (
    IDLE_UPLOAD_S,
    KEYS,
    SHARED,
    Server,
    adapter_files,
    keys_file,
    quotas,
)


@pytest.fixture(scope="package")
def server(model_dirs, adapter_dirs, tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("reliability")
    adapter = adapter_dirs["llama"]["r4-attn"]
    size = sum(len(data) for data in adapter_files(adapter).values())
    keys = keys_file(root / "keys.json", KEYS, quotas(size))
    log = root / "server.log"
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--device-slots", "4",
        "--adapter", f"{SHARED}={adapter_dirs['llama']['r8-all']}",
        "--upload-idle-timeout-seconds", str(IDLE_UPLOAD_S),
    ]  # fmt: skip
    with running_server(*flags, log_path=log) as (address, process):
        yield Server(address, log, adapter, root / "store", process.pid)
