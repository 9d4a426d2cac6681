"""The server distribution depends on the client distribution instead of bundling it: the root
`loraserve` wheel holds `loraserve/` alone and requires `loraserve-client` in a range that takes
the checkout's client version, and every install from a checkout (scripts/setup.sh, the
Dockerfile, the GPU check) installs the client first, since no package index holds it.

The wheel is built offline by this environment's setuptools from a copy of the sources, so the
checkout stays clean.
"""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def project(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text())["project"]


def client_requirement() -> Requirement:
    """The server's requirement on the client distribution, as pyproject.toml declares it."""
    found = [
        Requirement(r)
        for r in project(REPO / "pyproject.toml")["dependencies"]
        if Requirement(r).name == "loraserve-client"
    ]
    assert len(found) == 1, "pyproject.toml: declare loraserve-client once in `dependencies`"
    return found[0]


def test_the_server_requires_the_checkouts_client_version():
    client_version = project(REPO / "clients" / "python" / "pyproject.toml")["version"]
    requirement = client_requirement()
    assert requirement.specifier.contains(client_version), (requirement, client_version)
    assert requirement.specifier, "pin a version range, not any loraserve-client"


@pytest.fixture(scope="module")
def server_wheel(tmp_path_factory) -> zipfile.ZipFile:
    root = tmp_path_factory.mktemp("server-wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignored = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "build")
    shutil.copytree(REPO / "server", source / "server", ignore=ignored)
    wheelhouse = root / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "-w", str(wheelhouse), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return zipfile.ZipFile(next(wheelhouse.glob("loraserve-*.whl")))


@pytest.mark.slow  # setuptools builds a wheel in a subprocess
def test_the_server_wheel_requires_the_client_and_holds_only_the_server(server_wheel):
    names = server_wheel.namelist()
    metadata_file = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.parser.Parser().parsestr(server_wheel.read(metadata_file).decode())
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or ()]
    assert client_requirement() in requires, metadata.get_all("Requires-Dist")
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"loraserve"}, packages
    assert "loraserve/model/kernels/cpu_kernels.cpp" in names  # package data still shipped


def pip_installs(script: Path) -> list[str]:
    """What each `pip install` line of `script` installs, in order (options left out)."""
    text = script.read_text().replace("\\\n", " ")
    installs = []
    for command in re.findall(r"pip install ([^\n&]+)", text):
        installs += [w.strip("'\"") for w in command.split() if not w.startswith("-")]
    return installs


@pytest.mark.parametrize(
    ("script", "client", "server"),
    [
        ("scripts/setup.sh", "./clients/python", ".[dev,bench,ray]"),
        ("deploy/docker/Dockerfile", "/src/clients/python", "/src"),
    ],
)
def test_installs_from_a_checkout_put_the_client_first(script, client, server):
    installs = pip_installs(REPO / script)
    assert client in installs and server in installs, installs
    assert installs.index(client) < installs.index(server), installs


def wheel_list(script: str, array: str) -> set[str]:
    """The distribution names in one bash array of `script`, e.g. `carried=(a==1 b)`."""
    found = re.search(rf"^{array}=\((.*?)\)", script, re.MULTILINE | re.DOTALL)
    assert found, f"scripts/device_wheels.sh: no `{array}=(...)` list"
    return {canonicalize_name(Requirement(word).name) for word in found.group(1).split()}


def test_the_gpu_check_carries_every_runtime_dependency_its_image_lacks():
    """A lent GPU machine has no network: a dependency that is neither in its image nor carried
    as a wheel stops the CUDA tests at import (as pydantic-settings and grpcio-health-checking
    did once)."""
    script = (REPO / "scripts" / "device_wheels.sh").read_text()
    covered = wheel_list(script, "image_has") | wheel_list(script, "carried")
    needed = {
        canonicalize_name(Requirement(r).name)
        for pyproject in (REPO / "pyproject.toml", REPO / "clients" / "python" / "pyproject.toml")
        for r in project(pyproject)["dependencies"]
    } - {"loraserve-client"}  # imported in place from the checkout
    assert needed <= covered, f"add to scripts/device_wheels.sh: {sorted(needed - covered)}"
