"""Configuration: every setting the reference (docs/configuration.md) lists sets the same value
through its flag, its environment variable and its config-file key; a wrong value through each
is refused with one line naming the setting, the value and what is accepted; precedence is
flags > environment > file > defaults; the reference is what the schema generates."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loraserve.cli import build_parser, serve_flags
from loraserve.config import EngineConfig, ServerConfig
from loraserve.settings import (
    ConfigError,
    Settings,
    accepted,
    env_of,
    flag_of,
    load_config,
    reference_markdown,
)

REFERENCE = Path(__file__).parents[1] / "docs" / "configuration.md"
# Settings that are valid only with others (the server checks them together).
COMPANIONS = {
    "tls_cert": {"tls_key": "key.pem"},
    "tls_key": {"tls_cert": "cert.pem"},
    "tls_client_ca": {"tls_cert": "cert.pem", "tls_key": "key.pem"},
}


@dataclass(frozen=True)
class Sample:
    text: str  # as a flag's argument or an environment variable
    json: Any  # as the config file holds it
    value: Any  # what the configuration then says


@dataclass(frozen=True)
class Wrong:
    text: str | None  # None: no text is wrong (a boolean flag takes none)
    json: Any


def reference_rows() -> dict[str, tuple[str, str]]:
    """setting -> (flag, environment variable), as the reference's table lists them."""
    rows = {}
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("| `"):
            cells = [cell.strip().strip("`") for cell in line.strip("|").split(" | ")]
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def schema(name: str) -> dict[str, Any]:
    prop = Settings.model_json_schema()["properties"][name]
    return next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")


def sample(name: str, model_dir: Path) -> Sample:
    """A valid value other than the default, derived from the setting's type."""
    prop, default = schema(name), Settings.model_fields[name].default
    if name == "model":
        return Sample(str(model_dir), str(model_dir), str(model_dir))
    if name == "device":
        return Sample("cpu", "cpu", "cpu")
    if "enum" in prop:
        choice = next(c for c in prop["enum"] if c != default)
        return Sample(choice, choice, choice)
    kind = prop["type"]
    if kind == "boolean":
        return Sample(str(not default).lower(), not default, not default)
    if kind == "integer":
        number = min(9400, prop.get("maximum", 9400)) if default is None else default + 1
        return Sample(str(number), number, number)
    if kind == "number":
        return Sample(str(default * 2), default * 2, default * 2)
    if kind == "array" and "prefixItems" in prop["items"]:
        return Sample("a=/x", ["a=/x"], (("a", "/x"),))
    if kind == "array":
        return Sample("q_proj", ["q_proj"], ("q_proj",))
    return Sample("/srv/x", "/srv/x", "/srv/x")


def wrong(name: str) -> Wrong:
    """A value of the wrong type or out of bounds: the file's JSON keeps its type."""
    prop = schema(name)
    kind = prop.get("type")
    if "enum" in prop:
        return Wrong("bogus", "bogus")
    if kind == "boolean":
        return Wrong(None, "true")
    if kind in ("integer", "number"):
        return Wrong("many", "16")
    if kind == "array" and "prefixItems" in prop["items"]:
        return Wrong("nodir", ["nodir"])
    if kind == "array":
        return Wrong("q-proj!", [5])
    return Wrong("cuda0" if name == "device" else "", 5)


def setting_of(config: ServerConfig, name: str) -> Any:
    return getattr(config.engine if name in EngineConfig.model_fields else config, name)


def from_flags(argv: list[str]) -> ServerConfig:
    args = build_parser().parse_args(["serve", *argv])
    return load_config(serve_flags(args), args.config)


def flag_argv(name: str, text: str) -> list[str]:
    if schema(name).get("type") == "boolean":
        return [flag_of(name) if text == "true" else "--no-" + flag_of(name)[2:]]
    return [flag_of(name), text]


def companion_flags(name: str) -> list[str]:
    return [arg for key, v in COMPANIONS.get(name, {}).items() for arg in (flag_of(key), v)]


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_of(name), raising=False)
    return monkeypatch


def test_the_reference_is_what_the_schema_generates():
    assert REFERENCE.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: python -m loraserve.settings > docs/configuration.md"
    )


def actions(parser: argparse.ArgumentParser, path: str = "loraserve"):
    """(command path, action) of every argument of every command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_the_reference_lists_every_setting_and_every_flag_has_help():
    assert set(reference_rows()) == set(Settings.model_fields)
    found = list(actions(build_parser()))
    assert len({path for path, _ in found}) > 8  # serve, generate, adapters upload, import, ...
    for path, action in found:
        assert action.help, f"{path} {action.option_strings or action.dest} has no help text"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_flag_environment_and_file_agree_with_the_reference(name, model_dir, clean_env, tmp_path):
    flag, variable = reference_rows()[name]
    good = sample(name, model_dir)
    assert good.value != Settings.model_fields[name].default
    companions = companion_flags(name)
    by_flag = from_flags([*flag_argv(name, good.text), *companions])
    clean_env.setenv(variable, good.text)
    by_env = from_flags(companions)
    clean_env.delenv(variable)
    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({name: good.json}))
    by_file = from_flags(["--config", str(config_file), *companions])
    assert flag == flag_of(name) and variable == env_of(name)
    for config in (by_flag, by_env, by_file):
        assert setting_of(config, name) == good.value


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_a_wrong_value_is_refused_in_one_line_naming_it(name, clean_env, tmp_path):
    bad = wrong(name)
    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({name: bad.json}))
    attempts = [(["--config", str(config_file)], f"key {name!r} in {config_file}", bad.json)]
    if bad.text is not None:
        repeated = schema(name).get("type") == "array"  # the parser collects a list
        as_given = [bad.text] if repeated else bad.text
        attempts.append(([flag_of(name), bad.text], flag_of(name), as_given))
    for argv, where, value in attempts:
        with pytest.raises(ConfigError) as refused:
            from_flags(argv)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"bad setting {name}: {value!r} ({where})"), message
    if bad.text is not None:
        clean_env.setenv(env_of(name), bad.text)
        with pytest.raises(ConfigError, match=f"{name}: {bad.text!r} \\({env_of(name)}\\)"):
            load_config({})


def test_the_message_says_what_is_accepted(clean_env, tmp_path):
    clean_env.setenv("LORASERVE_GATEWAY_METRICS", "ture")
    with pytest.raises(ConfigError) as refused:
        load_config({})
    assert str(refused.value) == (
        "bad setting gateway_metrics: 'ture' (LORASERVE_GATEWAY_METRICS) is not true or false"
    )
    assert accepted("device_slots") == "an integer >= 1"


def test_defaults_when_nothing_is_given(clean_env):
    config = load_config({})
    assert config == ServerConfig()
    assert config.engine == EngineConfig()


def test_flags_win_over_environment_which_wins_over_the_file(clean_env, tmp_path):
    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({"device_slots": 2, "port": 1000, "max_rank": 8}))
    clean_env.setenv("LORASERVE_DEVICE_SLOTS", "3")
    clean_env.setenv("LORASERVE_PORT", "2000")
    config = load_config({"device_slots": "4", "port": None}, config_file)
    assert config.engine.device_slots == 4  # flag
    assert config.port == 2000  # environment (the flag was left unset)
    assert config.engine.max_rank == 8  # file


def test_environment_lists_are_comma_separated(clean_env):
    clean_env.setenv("LORASERVE_ADAPTERS", "a=/x,b=/y")
    clean_env.setenv("LORASERVE_LORA_TARGET_MODULES", "q_proj,v_proj")
    config = load_config({})
    assert config.adapters == (("a", "/x"), ("b", "/y"))
    assert config.engine.lora_target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(("environ", "file_value", "want"),
                         [("true", None, "4bit"), ("False", None, "off"), (None, True, "4bit"),
                          (None, False, "off"), ("int8", None, "int8")])  # fmt: skip
def test_quantize_output_still_takes_the_switch_it_was(
    environ, file_value, want, clean_env, tmp_path
):
    """Before it named a format, quantize_output was on or off: on is the base's 4 bits."""
    config_file = tmp_path / "settings.json"
    config_file.write_text(
        json.dumps({} if file_value is None else {"quantize_output": file_value})
    )
    if environ is not None:
        clean_env.setenv("LORASERVE_QUANTIZE_OUTPUT", environ)
    assert load_config({}, config_file).engine.quantize_output == want


def test_quantize_output_s_flag_alone_is_the_switch_it_was(clean_env):
    assert from_flags(["--quantize-output"]).engine.quantize_output == "4bit"
    assert from_flags(["--quantize-output", "int8"]).engine.quantize_output == "int8"
    assert from_flags([]).engine.quantize_output == "off"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"tls_cert": "c.pem"}, "bad configuration: tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
        ({"max_batch_size": "100", "max_step_tokens": "50"}, "max_step_tokens must be >="),
    ],
)
def test_settings_checked_together_say_what_is_wrong(clean_env, flags, words):
    with pytest.raises(ConfigError, match=words):
        load_config(flags)


@pytest.mark.parametrize(
    ("argv", "environ", "file_text", "line"),
    [
        (
            [],
            {},
            '{"device_slots": "16"}',
            "bad setting device_slots: '16' (key 'device_slots' in {file}) is not an integer >= 1",
        ),
        (
            [],
            {"LORASERVE_GATEWAY_METRICS": "ture"},
            None,
            "bad setting gateway_metrics: 'ture' (LORASERVE_GATEWAY_METRICS) is not true or false",
        ),
        (
            ["--model", "/no/such/model"],
            {},
            None,
            "bad setting model: '/no/such/model': no such directory; give an HF model directory "
            "or a hub id",
        ),
        ([], {}, "{not json", "config file {file}: not JSON: "),
        (
            ["adapters", "import", ".", "--tenant", "t", "--name", "n"],
            {"LORASERVE_MAX_RANK": "lots"},
            None,
            "bad setting max_rank: 'lots' (LORASERVE_MAX_RANK) is not an integer >= 1",
        ),
    ],
)
def test_the_command_refuses_a_bad_setting_with_one_line(argv, environ, file_text, line, tmp_path):
    config_file = tmp_path / "settings.json"
    if file_text is not None:
        config_file.write_text(file_text)
        argv = [*argv, "--config", str(config_file)]
    command = argv if argv[:1] == ["adapters"] else ["serve", *argv]
    result = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_environ_without_settings(), **environ},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("loraserve: " + line.format(file=config_file))


def _environ_without_settings() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}


def test_a_huge_or_odd_value_is_quoted_short_and_on_one_line(clean_env):
    clean_env.setenv("LORASERVE_PORT", "9" * 100_000)
    with pytest.raises(ConfigError) as refused:
        load_config({})
    assert len(str(refused.value)) < 300
    clean_env.delenv("LORASERVE_PORT")
    with pytest.raises(ConfigError) as refused:
        load_config({"device": "cuda\n0"})
    assert "\n" not in str(refused.value) and "'cuda\\n0'" in str(refused.value)
