"""Client test set-up: `loraserve_client` importable from clients/python, here and in the
subprocesses that run `python -m loraserve_client`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

CLIENT_ROOT = Path(__file__).resolve().parents[2] / "clients" / "python"
if str(CLIENT_ROOT) not in sys.path:
    sys.path.insert(0, str(CLIENT_ROOT))


@pytest.fixture(scope="session")
def client_env() -> dict[str, str]:
    """The environment for `python -m loraserve_client` subprocesses."""
    path = os.pathsep.join(filter(None, (str(CLIENT_ROOT), os.environ.get("PYTHONPATH"))))
    return dict(os.environ, PYTHONPATH=path)
