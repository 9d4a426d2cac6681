"""The client commands without a model: usage errors, error lines and exit codes, the adapter
commands against the in-process fakes, and mounting the commands on another parser."""

from __future__ import annotations

import argparse
import json

import pytest
from tests.api.server_process import free_port
from tests.clients.fakes import Behaviour, fake_server, write_adapter_dir

from loraserve_client.cli import DEFAULT_SERVER, add_client_commands, main


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["adapters"],
        ["adapters", "upload", "dir"],
        ["generate", "hi", "--max-new-tokens", "many"],
        ["generate", "hi", "--adapter", "a", "--each-adapter"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unreachable_server_prints_the_code_and_exits_1(capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert main(["health", "--server", dead, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ") and err.count("\n") == 1


def test_each_adapter_cannot_stream(capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert main(["generate", "hi", "--each-adapter", "--stream", "--server", dead]) == 2
    assert "leave out --stream" in capsys.readouterr().err


def test_upload_of_a_pickle_directory_is_refused(tmp_path, capsys):
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    dead = f"127.0.0.1:{free_port()}"
    assert main(["adapters", "upload", str(tmp_path), "--name", "a", "--server", dead]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "pickle" in err


def test_adapter_commands(tmp_path, capsys):
    behaviour = Behaviour()
    with fake_server(behaviour) as address:

        def run(*argv: str) -> str:
            assert main([*argv, "--server", address, "--api-key", "k"]) == 0
            return capsys.readouterr().out

        directory = str(write_adapter_dir(tmp_path, b"weights"))
        assert run("adapters", "upload", directory, "--name", "a") == "uploaded a version 1\n"
        assert json.loads(run("adapters", "upload", directory, "--name", "a", "--json"))["version"]
        table = run("adapters", "list").splitlines()
        assert table[0].split() == ["NAME", "VERSION", "RANK", "RESIDENCY", "PINNED"]
        assert [row.split() for row in table[1:]] == [
            ["a", "1", "4", "disk", "False"],
            ["a", "2", "4", "disk", "False"],
        ]
        listed = json.loads(run("adapters", "list", "--json"))
        assert [(a["name"], a["version"]) for a in listed] == [("a", "1"), ("a", "2")]
        got = json.loads(run("adapters", "get", "a", "--json"))
        assert got["version"] == "2" and got["files"][0]["filename"] == "adapter_config.json"
        assert got["create_time"].endswith("+00:00")
        described = run("adapters", "get", "a", "--version", "1")
        assert "version:" in described and "q_proj, v_proj" in described
        assert run("adapters", "delete", "a", "--version", "1") == "deleted a version(s) 1\n"
        assert json.loads(run("adapters", "delete", "a", "--json")) == {"deleted_versions": ["2"]}
        assert main(["adapters", "get", "a", "--server", address]) == 1
        assert capsys.readouterr().err == "error: NOT_FOUND: adapter 'a' not found\n"
    assert all(c.metadata.get("authorization") == "Bearer k" for c in behaviour.calls[:-1])


def test_commands_mount_on_another_parser_with_env_defaults():
    parser = argparse.ArgumentParser(prog="loraserve")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    add_client_commands(sub, {"LORASERVE_SERVER": "gpu-box:7000", "LORASERVE_API_KEY": "k"})
    args = parser.parse_args(["generate", "hi", "--stop", "a", "--stop", "b", "--json"])
    assert (args.server, args.api_key, args.json) == ("gpu-box:7000", "k", True)
    assert args.stop == ["a", "b"]
    assert callable(args.client_handler)
    assert not hasattr(parser.parse_args(["serve"]), "client_handler")
    defaults = argparse.ArgumentParser()
    add_client_commands(defaults.add_subparsers(dest="command"), {})
    args = defaults.parse_args(["info"])
    assert (args.server, args.api_key) == (DEFAULT_SERVER, None)
