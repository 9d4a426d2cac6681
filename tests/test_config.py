"""Configuration precedence: flags > LORASERVE_* environment > config file > defaults."""

from __future__ import annotations

import pytest

from loraserve.config import EngineConfig, ServerConfig, build_server_config


def test_defaults_when_nothing_is_given():
    config = build_server_config({}, {}, {})
    assert config == ServerConfig()
    assert config.engine == EngineConfig()


def test_flags_win_over_environment_which_wins_over_the_file():
    file_values = {"device_slots": 2, "port": 1000, "max_rank": 8, "host": "0.0.0.0"}
    environ = {"LORASERVE_DEVICE_SLOTS": "3", "LORASERVE_PORT": "2000"}
    flags = {"device_slots": 4, "port": None}
    config = build_server_config(flags, environ, file_values)
    assert config.engine.device_slots == 4  # flag
    assert config.port == 2000  # environment (the flag was left unset)
    assert config.engine.max_rank == 8  # file
    assert config.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("variable", "text", "field", "want"),
    [
        ("LORASERVE_METRICS_PORT", "9400", "metrics_port", 9400),  # int | None
        ("LORASERVE_DRAIN_GRACE_SECONDS", "2.5", "drain_grace_seconds", 2.5),
        ("LORASERVE_GATEWAY_METRICS", "false", "gateway_metrics", False),
        ("LORASERVE_API_KEYS", "/etc/keys.json", "api_keys", "/etc/keys.json"),
        ("LORASERVE_ADAPTERS", "a=/x,b=/y", "adapters", (("a", "/x"), ("b", "/y"))),
    ],
)
def test_environment_values_are_parsed_to_the_field_type(variable, text, field, want):
    assert getattr(build_server_config({}, {variable: text}, {}), field) == want


def test_engine_settings_parse_from_the_environment_too():
    config = build_server_config({}, {"LORASERVE_LORA_TARGET_MODULES": "q_proj,v_proj"}, {})
    assert config.engine.lora_target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("flags", "environ", "file_values", "words"),
    [
        ({}, {"LORASERVE_PORT": "eighty"}, {}, "LORASERVE_PORT='eighty' is not a valid int"),
        ({}, {}, {"no_such_setting": 1}, "unknown settings in the config file: no_such_setting"),
        ({"adapters": ["nodir"]}, {}, {}, "NAME=DIRECTORY"),
        ({"device_slots": 0}, {}, {}, "device_slots must be >= 1"),
        ({"tls_cert": "c.pem"}, {}, {}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, {}, {}, "tls_client_ca"),
        ({}, {"LORASERVE_UPLOAD_IDLE_TIMEOUT_SECONDS": "0"}, {}, "must be > 0"),
    ],
)
def test_bad_settings_say_what_is_wrong(flags, environ, file_values, words):
    with pytest.raises(ValueError, match=words):
        build_server_config(flags, environ, file_values)
