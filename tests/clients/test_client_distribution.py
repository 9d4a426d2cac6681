"""The client installs alone: `pip install ./clients/python` into a fresh virtual environment
without torch (or the server), and its CLI and library then talk to a real server.

Offline: the client's few dependencies (grpcio, grpcio-health-checking, protobuf and what they
need) are linked from this interpreter's site-packages into a folder the new environment reads
through a .pth file; nothing else of this environment (torch, transformers, the server) is
visible there, and pip installs the client with `--no-index`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.api.server_process import running_server

pytestmark = pytest.mark.slow  # a virtual environment, a pip install and a server process

REPO = Path(__file__).resolve().parents[2]


def requirements(distribution: str) -> set[str]:
    """`distribution` and everything it needs (extras left out), by normalized name."""
    wanted, seen = [distribution], set()
    while wanted:
        name = re.sub(r"[-_.]+", "-", wanted.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for requirement in importlib.metadata.requires(name) or ():
            if "extra ==" not in requirement:
                wanted.append(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))  # type: ignore[union-attr]
    return seen


def link_distributions(names: set[str], into: Path) -> None:
    """Link each distribution's top-level files and metadata from site-packages into `into`."""
    into.mkdir()
    for name in names:
        distribution = importlib.metadata.distribution(name)
        for file in distribution.files or ():
            top = file.parts[0]
            if top.endswith((".pth", "__pycache__")) or top == "..":
                continue
            source = Path(distribution.locate_file(top))
            target = into / top
            if source.exists() and not target.exists():
                target.symlink_to(source)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    deps = root / "deps"
    link_distributions(set().union(*map(requirements, CLIENT_DEPENDENCIES)), deps)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "client-deps.pth").write_text(f"{deps}\n")
    source = root / "client-source"  # pip builds in the tree: keep the checkout clean
    shutil.copytree(
        REPO / "clients" / "python", source, ignore=shutil.ignore_patterns("__pycache__")
    )
    wheelhouse = root / "wheels"  # built by this environment's setuptools, installed there
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "-w", str(wheelhouse), str(source)])  # fmt: skip
    wheel = next(wheelhouse.glob("loraserve_client-*.whl"))
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--quiet", str(wheel)])
    return venv


CLIENT_DEPENDENCIES = ("grpcio", "grpcio-health-checking", "protobuf")


def bare_env() -> dict[str, str]:
    """This environment without the checkout on the path (the client must come from the
    install) and without the LORASERVE_* settings."""
    return {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("LORASERVE_")
    }


def run(command: list[str]) -> None:
    done = subprocess.run(command, env=bare_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def in_venv(venv: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]],
        env=bare_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_client_has_no_torch_and_no_server(client_venv):
    probe = (
        "import importlib.util, json, loraserve_client;"
        "print(json.dumps([loraserve_client.__file__] + "
        "[importlib.util.find_spec(m) is not None for m in ('torch', 'loraserve')]))"
    )
    done = in_venv(client_venv, "python", "-c", probe)
    assert done.returncode == 0, done.stderr
    location, has_torch, has_server = json.loads(done.stdout)
    assert location.startswith(str(client_venv))
    assert not has_torch and not has_server
    requires = in_venv(client_venv, "python", "-m", "pip", "show", "loraserve-client")
    assert "Requires: grpcio, grpcio-health-checking, protobuf" in requires.stdout


def test_the_installed_cli_and_library_talk_to_a_real_server(client_venv, model_dirs, tmp_path):
    flags = ["--model", str(model_dirs["llama"]), "--device", "cpu",
             "--adapter-dir", str(tmp_path / "store")]  # fmt: skip
    with running_server(*flags, log_path=tmp_path / "server.log") as (address, _):
        health = in_venv(client_venv, "loraserve-client", "health", "--server", address)
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
        generated = in_venv(
            client_venv, "loraserve-client", "generate", "--server", address, "--json",
            "--max-new-tokens", "3", "--ignore-eos", "hello",
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        assert json.loads(generated.stdout)["completion_tokens"] == 3
        script = (
            "import sys; from loraserve_client import Client\n"
            "with Client(sys.argv[1]) as client:\n"
            "    print(client.generate('hi', max_new_tokens=2, ignore_eos=True).completion_tokens)"
        )
        library = in_venv(client_venv, "python", "-c", script, address)
        assert library.returncode == 0, library.stderr
        assert library.stdout.strip() == "2"
