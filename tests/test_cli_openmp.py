"""`loraserve serve` bounds libgomp's spinning before torch loads (libgomp reads the setting
only then), unless the environment already says how long to spin."""

from __future__ import annotations

import os
import subprocess
import sys

from loraserve.cli import OPENMP_SPIN_COUNT

PROBE = """
import os, sys
import loraserve.cli as cli
assert "torch" not in sys.modules, "the CLI imported torch before it could set GOMP_SPINCOUNT"
cli._short_openmp_spin()
print(os.environ["GOMP_SPINCOUNT"])
"""


def _spin_count(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_serve_sets_a_short_spin_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spin_count(env) == OPENMP_SPIN_COUNT


def test_a_spin_count_in_the_environment_wins():
    assert _spin_count({**os.environ, "GOMP_SPINCOUNT": "300000"}) == "300000"
