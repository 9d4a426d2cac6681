"""What `make lint` checks, as tests, so that CI (which runs the README's set-up and test
commands) fails on it too: ruff (lint and format) over the repository, mypy over server/ and
clients/ (configured in pyproject.toml), and no `assert` statement in production code, where
`python -O` would drop it. buf lint runs in tests/api/test_contract.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = (REPO / "server" / "loraserve", REPO / "clients" / "python" / "loraserve_client")
GENERATED = REPO / "server" / "loraserve" / "v1"


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")])
def test_ruff_is_clean(command):
    done = run("ruff", *command, timeout=120)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean():
    """Over a minute on a cold cache (torch's stubs), seconds after."""
    done = run("mypy")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_production_code_raises_instead_of_asserting():
    asserts = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for root in PRODUCTION
        for path in sorted(root.rglob("*.py"))
        if GENERATED not in path.parents
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert asserts == [], f"`python -O` drops these checks; raise instead: {asserts}"
