"""The client imports neither torch, transformers nor the server (its stubs are its own)."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["transformers"] = None
import loraserve_client, loraserve_client.cli, loraserve_client.aio
print(json.dumps(sorted(name for name, module in sys.modules.items() if module)))
"""


def test_client_imports_no_torch_and_no_server_code(client_env):
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=client_env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout)
    assert "loraserve_client.cli" in modules
    assert "loraserve_client.v1.generation_pb2" in modules
    assert not [m for m in modules if m == "loraserve" or m.startswith("loraserve.")]
    for banned in ("torch", "transformers", "peft", "safetensors", "numpy"):
        assert not any(m == banned or m.startswith(banned + ".") for m in modules), banned
