"""One real `loraserve serve` process for the reliability suite: two tenants with API keys, the
tiny llama on the CPU, its own adapter store."""

from __future__ import annotations

import json

import pytest
from tests.api.server_process import running_server
from tests.reliability.helpers import KEYS, Server


@pytest.fixture(scope="package")
def server(model_dirs, adapter_dirs, tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("reliability")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": k, **entry} for k, entry in KEYS.items()]}))
    log = root / "server.log"
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--device-slots", "4",
    ]  # fmt: skip
    with running_server(*flags, log_path=log) as (address, _):
        yield Server(address, log, adapter_dirs["llama"]["r4-attn"])
