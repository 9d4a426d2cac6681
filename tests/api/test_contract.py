"""The API contract: buf lint (STANDARD) passes and the checked-in stubs are up to date."""

from __future__ import annotations

import subprocess
import sys

from tests.api.buf import REPO, buf_or_skip


def test_buf_lint_standard_is_clean():
    result = subprocess.run(
        [buf_or_skip(), "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_checked_in_stubs_match_the_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh_dir = tmp_path / "loraserve" / "v1"
    checked_in_dir = REPO / "server" / "loraserve" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    checked_in = {
        p.name: p.read_bytes()
        for p in checked_in_dir.iterdir()
        if p.is_file() and p.suffix != ".pyc"
    }
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"
