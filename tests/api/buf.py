"""Locate the buf CLI (installed by the README's set-up into .tools/)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def buf_or_skip() -> str:
    """The buf executable; in CI its absence is a failure, elsewhere a skip."""
    local = REPO / ".tools" / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        message = "buf CLI not found: run the README's set-up (npm install ... @bufbuild/buf)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
