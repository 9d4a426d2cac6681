"""Where settings come from, and what derives from their schema.

`load_config` merges `serve` flags, `LORASERVE_*` environment variables (read by
pydantic-settings) and a JSON config file, with that precedence, into one `ServerConfig`.
Each source is checked on its own first, so a wrong value is refused with one line naming the
setting, where the value came from (flag, variable or file), the value and what is accepted
(`ConfigError`): the file strictly, since JSON has types (`"16"` is not a number), flags and
variables as text. The merged values are then checked together (tls_cert needs tls_key).
`load_local_config` also checks that a `model` directory exists here: the schema leaves paths
alone, since deploy files and Ray drivers name paths of the machine the server runs on.

`add_setting_flags` makes the `serve` flags and `reference_markdown` writes
`docs/configuration.md` (`python -m loraserve.settings > docs/configuration.md`), both from the
same schema, so they cannot drift.

Knows nothing about what the settings do: `loraserve.config` declares them.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from loraserve.config import EngineConfig, ServerConfig, ServerFields, model_problem
from loraserve.types import shown

ENV_PREFIX = "LORASERVE_"


class ConfigError(ValueError):
    """A configuration refused at start-up; its message is one line."""


class Settings(EngineConfig, ServerFields):
    """Every setting, flat: the schema each source is checked against."""

    def to_config(self) -> ServerConfig:
        values = self.model_dump()
        engine = {name: values.pop(name) for name in EngineConfig.model_fields}
        return ServerConfig(engine=EngineConfig(**engine), **values)


class _Environment(BaseSettings, Settings):
    """How pydantic-settings finds settings among environment variables (raw text; they are
    checked against `Settings` like every source)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, enable_decoding=False)


def _extra(name: str, key: str) -> str | None:
    extra = Settings.model_fields[name].json_schema_extra
    value = extra.get(key) if isinstance(extra, dict) else None
    return None if value is None else str(value)


def flag_of(name: str) -> str:
    return _extra(name, "flag") or "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def accepted(name: str) -> str:
    """What a setting accepts, in words, from its JSON schema."""
    prop = _schema()["properties"][name]
    choices = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    words = " or ".join(_accepted_one(p) for p in choices)
    return words + (" (or unset)" if len(choices) < len(prop.get("anyOf", [prop])) else "")


@functools.cache
def _schema() -> dict[str, Any]:
    return Settings.model_json_schema()


def _accepted_one(prop: Mapping[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    kind = prop.get("type")
    if kind == "boolean":
        return "true or false"
    if kind == "array":
        return "a list of " + ("NAME=DIR" if "prefixItems" in prop.get("items", {}) else "names")
    words = {"integer": "an integer", "number": "a number", "string": "a string"}[str(kind)]
    if "minimum" in prop and "maximum" in prop:
        return f"{words} from {prop['minimum']} to {prop['maximum']}"
    if "minimum" in prop:
        return f"{words} >= {prop['minimum']}"
    if "exclusiveMinimum" in prop:
        return f"{words} > {prop['exclusiveMinimum']}"
    if "pattern" in prop:
        return f"{words} matching {prop['pattern']}"
    if "minLength" in prop:
        return f"a non-empty {words.removeprefix('a ')}"
    return words


def _problems(error: ValidationError, values: Mapping[str, Any], where: Callable[[str], str]):
    """One phrase per field the source got wrong, the value quoted short and ASCII; errors of
    the whole model are left to the check of the merged values."""
    for item in error.errors():
        if not item["loc"]:
            continue
        name = str(item["loc"][0])
        if item["type"] == "extra_forbidden":
            yield f"{where(name)} is not a setting (see docs/configuration.md)"
        elif item["type"] == "value_error":
            reason = str(item["msg"]).removeprefix("Value error, ")
            yield f"{name}: {shown(values[name])} ({where(name)}): {reason}"
        else:
            yield f"{name}: {shown(values[name])} ({where(name)}) is not {accepted(name)}"


def _checked(values: Mapping[str, Any], where: Callable[[str], str], text: str | None = None):
    """Refuse `values` (from one source) when a field is wrong; `text`: the JSON they were
    read from, checked strictly."""
    try:
        if text is None:
            Settings.model_validate(values)
        else:
            Settings.model_validate_json(text, strict=True)
    except ValidationError as error:
        problems = list(_problems(error, values, where))
        if problems:
            raise ConfigError("bad setting " + "; ".join(problems)) from None


def _file_values(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        values = json.loads(text)
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path}: not JSON: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: must hold a JSON object of settings")
    _checked(values, lambda name: f"key {name!r} in {path}", text)
    return values


def load_config(
    flags: Mapping[str, Any],
    config_file: Path | None = None,
    file_values: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Flags (setting name -> value; None: not given) > environment > file > default.

    The file is `config_file`, or `file_values` already read from one (Ray Serve's options).
    """
    if config_file is not None:
        from_file = _file_values(config_file)
    else:
        from_file = dict(file_values or {})
        _checked(from_file, lambda name: f"key {name!r}")
    from_env = EnvSettingsSource(_Environment)()
    _checked(from_env, env_of)
    from_flags = {name: value for name, value in flags.items() if value is not None}
    _checked(from_flags, flag_of)
    try:
        settings = Settings.model_validate({**from_file, **from_env, **from_flags})
    except ValidationError as error:
        reasons = (str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
        raise ConfigError("bad configuration: " + "; ".join(reasons)) from None
    return settings.to_config()


def load_local_config(flags: Mapping[str, Any], config_file: Path | None = None) -> ServerConfig:
    """`load_config`, also refusing a `model` directory this machine lacks."""
    config = load_config(flags, config_file)
    problem = model_problem(config.engine.model)
    if problem is not None:
        raise ConfigError(f"bad setting model: {shown(config.engine.model)}: {problem}")
    return config


def add_setting_flags(
    parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None
) -> None:
    """One flag per setting (or per setting in `names`): `--name` (booleans also `--no-name`;
    lists repeat the flag)."""
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        default = "unset" if field.default is None else json.dumps(field.default)
        help_text = f"{field.description} [{accepted(name)}; default {default}; {env_of(name)}]"
        help_text = help_text.replace("%", "%%")
        if field.annotation is bool:
            action: Any = argparse.BooleanOptionalAction
            parser.add_argument(flag_of(name), dest=name, action=action, help=help_text)
        elif str(field.annotation).startswith("tuple"):
            metavar = "NAME=DIR" if "NAME=DIR" in accepted(name) else "NAME"
            parser.add_argument(
                flag_of(name), dest=name, action="append", metavar=metavar, help=help_text
            )
        else:
            metavar = name.split("_")[-1].upper()
            bare = _extra(name, "bare")  # the value the flag alone gives, if it may stand alone
            alone: dict[str, Any] = {} if bare is None else {"nargs": "?", "const": bare}
            parser.add_argument(flag_of(name), dest=name, metavar=metavar, help=help_text, **alone)


def reference_markdown() -> str:
    """docs/configuration.md, from the schema."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from server/loraserve/config.py by "
        "`python -m loraserve.settings > docs/configuration.md`; do not edit by hand. -->",
        "",
        "Every setting of `loraserve serve` can be given as a flag, as a `LORASERVE_*` "
        "environment variable, or as a key of the JSON file named by `--config`; a flag wins "
        "over the environment, which wins over the file. Booleans take `--name` / `--no-name` "
        "flags and `true` / `false` in the environment; lists repeat the flag and are "
        "comma-separated in the environment and JSON arrays in the file. The file is read "
        'strictly: `{"device_slots": "16"}` is refused, write `{"device_slots": 16}`.',
        "",
        "A wrong value stops start-up with one line naming the setting, the value, where it "
        "came from and what is accepted, for example:",
        "",
        "```",
        "loraserve: bad setting gateway_metrics: 'ture' (LORASERVE_GATEWAY_METRICS) is not "
        "true or false",
        "```",
        "",
        "| Setting | Flag | Environment | Accepted | Default | Description |",
        "|---|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else f"`{json.dumps(field.default)}`"
        cells = (f"`{flag_of(name)}`", f"`{env_of(name)}`", accepted(name), default)
        row = " | ".join(cell.replace("|", "\\|") for cell in (*cells, str(field.description)))
        lines.append(f"| `{name}` | {row} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
