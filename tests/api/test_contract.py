"""The API contract: buf lint (STANDARD) passes, the checked-in stubs are up to date and
importable with every grpcio and protobuf the distributions admit, and buf breaking finds no
wire-incompatible change against the released contract."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from tests.api.buf import REPO, buf_or_skip
from tests.test_distribution import project


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
    fresh_dir = tmp_path / "loraserve_client" / "v1"
    checked_in_dir = REPO / "clients" / "python" / "loraserve_client" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    checked_in = {
        p.name: p.read_bytes()
        for p in checked_in_dir.iterdir()
        if p.is_file() and p.suffix != ".pyc"
    }
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"


STUBS = REPO / "clients" / "python" / "loraserve_client" / "v1"


def stub_versions(pattern: str, glob: str) -> set[Version]:
    """The version each checked-in stub matching `glob` names by `pattern` (one group)."""
    found = {re.search(pattern, path.read_text()) for path in STUBS.glob(glob)}
    assert None not in found, f"a stub {glob} names no version: {pattern}"
    return {Version(match.group(1)) for match in found if match is not None}


@pytest.mark.parametrize("pyproject", ["pyproject.toml", "clients/python/pyproject.toml"])
def test_the_distributions_admit_only_runtimes_the_stubs_import_with(pyproject):
    """The generated stubs refuse, at import, a grpcio older than the grpcio-tools that wrote
    them and a protobuf older than their gencode: each distribution's floor is at least that."""
    needed = {
        "grpcio": max(stub_versions(r"GRPC_GENERATED_VERSION = '([\d.]+)'", "*_grpc.py")),
        "protobuf": max(stub_versions(r"# Protobuf Python Version: ([\d.]+)", "*_pb2.py")),
    }
    requirements = [Requirement(r) for r in project(REPO / pyproject)["dependencies"]]
    for package, version in needed.items():
        floors = [
            Version(spec.version)
            for requirement in requirements
            if requirement.name == package
            for spec in requirement.specifier
            if spec.operator == ">="
        ]
        assert len(floors) == 1, f"{pyproject} should require {package}>=..."
        assert floors[0] >= version, (pyproject, package, version, floors)


# The contract as last released without constrained decoding (main before issue 12): every
# later change must stay wire compatible with it (buf's FILE rules).
BASELINE_COMMIT = "fd0c11f869351a2595f14de96a80a44af11f58fa"


def _protos_at(commit: str, into: Path) -> Path:
    """protos/ as of `commit`, extracted under `into`; a skip (a failure in CI) without it."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "protos"], capture_output=True, timeout=60
    )
    if archive.returncode != 0:
        message = f"the baseline commit {commit[:12]} is not in this checkout's history"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "protos"


def _breaking(protos: Path, against: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [buf_or_skip(), "breaking", str(protos), "--against", str(against)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_buf_breaking_finds_no_change_against_the_released_contract(tmp_path):
    baseline = _protos_at(BASELINE_COMMIT, tmp_path / "baseline")
    result = _breaking(REPO / "protos", baseline)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_changed_field_type(tmp_path):
    baseline = _protos_at(BASELINE_COMMIT, tmp_path / "baseline")
    changed = tmp_path / "changed" / "protos"
    shutil.copytree(REPO / "protos", changed)
    proto = changed / "loraserve" / "v1" / "generation.proto"
    text = proto.read_text()
    assert "bool ignore_eos = 8;" in text
    proto.write_text(text.replace("bool ignore_eos = 8;", "string ignore_eos = 8;"))
    result = _breaking(changed, baseline)
    assert result.returncode != 0 and "ignore_eos" in result.stdout, result.stdout
