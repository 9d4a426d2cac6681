"""Promise: nothing a tenant uploads is ever run. A pickle whose loading would create a marker
file is refused (under its own name and disguised as safetensors); a config pointing PEFT's
`auto_mapping` and `base_model_name_or_path` at a model directory with remote code that would
create the marker on import is served without that code running."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grpc
import pytest
from tests.reliability.helpers import (
    CONFIG,
    WEIGHTS,
    adapter_files,
    generation,
    metadata,
    refusal,
    upload,
    with_config,
)

from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc


class MarksWhenLoaded:
    """Unpickling this opens (creates) the marker file: code that runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def remote_code_model(directory: Path, marker: Path) -> Path:
    """A model directory whose config asks for remote code that creates `marker` on import."""
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Evil"}})
    )
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nEvil = object\n")
    return directory


@pytest.mark.parametrize("filename", ["adapter_model.bin", WEIGHTS])
def test_a_pickle_is_refused_unloaded(server, marker, filename, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(MarksWhenLoaded(control)))  # the control: the payload is live
    assert control.exists()
    files = adapter_files(server.adapter)
    uploaded = {CONFIG: files[CONFIG], filename: pickle.dumps(MarksWhenLoaded(marker))}
    error = refusal(lambda: upload(server, "alpha-key", "pickled", uploaded))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert not marker.exists()
    assert server.staged() == []


def test_config_pointing_at_remote_code_never_runs_it(server, marker, tmp_path):
    model = remote_code_model(tmp_path / "remote-model", marker)

    def point_at_code(config: dict) -> None:
        config["base_model_name_or_path"] = str(model)
        config["auto_mapping"] = {"base_model_class": "Evil", "parent_library": "evil"}

    files = with_config(adapter_files(server.adapter), point_at_code)
    upload(server, "alpha-key", "pointing", files)
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = gpb.GenerateRequest(input=generation("Run?", "pointing", 3))
        reply = stub.Generate(request, metadata=metadata("alpha-key"), timeout=60)
    assert reply.usage.completion_tokens == 3
    assert not marker.exists()
