"""The upload's local side: refusing what can never be uploaded, before any network call, and
the message stream (header first, chunks of at most 1 MiB that reassemble to the files)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from tests.api.server_process import free_port

from loraserve_client import Client, InvalidArgument
from loraserve_client.upload import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_files,
    prepare_upload,
    upload_requests,
)

MIB = 1 << 20  # the contract's largest chunk
CONFIG = b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    (tmp_path / CONFIG_FILE).write_bytes(CONFIG)
    (tmp_path / WEIGHTS_FILE).write_bytes(os.urandom(2 * MIB + 12345))
    return tmp_path


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({CONFIG_FILE: CONFIG, "adapter_model.bin": b"x"}, ("pickle", "safetensors", ".bin")),
        ({CONFIG_FILE: CONFIG}, (f"has no {WEIGHTS_FILE}: save", "save_pretrained")),
        ({}, ("is empty", CONFIG_FILE, WEIGHTS_FILE, "save_pretrained")),
        ({WEIGHTS_FILE: b"x"}, (f"no {CONFIG_FILE}",)),
        (None, ("is not a directory",)),
    ],
)
def test_refuses_locally_before_any_network_call(tmp_path, files, words):
    directory = tmp_path / "adapter"
    if files is not None:
        directory.mkdir()
        for name, data in files.items():
            (directory / name).write_bytes(data)
    # Nothing listens there: an attempted call would raise Unavailable instead.
    with Client(f"127.0.0.1:{free_port()}") as client, pytest.raises(InvalidArgument) as caught:
        client.upload_adapter(directory, "mine")
    assert all(word in caught.value.details for word in words), caught.value.details
    if not any("pickle" in word for word in words):
        assert "pickle" not in caught.value.details


def test_header_first_then_chunks_that_reassemble_the_files(adapter_dir):
    files = adapter_files(adapter_dir)
    messages = list(upload_requests("mine", "3", files))
    header = messages[0].header
    assert messages[0].WhichOneof("part") == "header"
    assert (header.name, header.version) == ("mine", "3")
    assert [m.WhichOneof("part") for m in messages[1:]] == ["chunk"] * (len(messages) - 1)
    assert all(len(m.chunk.data) <= MIB for m in messages[1:])
    assert len(messages) == 1 + 1 + 3  # the config, then the weights in three chunks
    for f in header.files:
        data = (adapter_dir / f.filename).read_bytes()
        sent = b"".join(m.chunk.data for m in messages[1:] if m.chunk.filename == f.filename)
        assert sent == data
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.size_bytes == len(data)
    assert [f.filename for f in header.files] == [CONFIG_FILE, WEIGHTS_FILE]


def test_empty_version_lets_the_server_choose(adapter_dir):
    header = next(upload_requests("mine", None, adapter_files(adapter_dir))).header
    assert header.version == ""


@pytest.mark.parametrize(
    ("progress", "stream", "shown"),
    [
        (None, io.StringIO(), False),
        (None, Terminal(), True),
        (True, io.StringIO(), True),
        (False, Terminal(), False),
    ],
)
def test_progress_bar_only_when_asked_or_on_a_terminal(adapter_dir, progress, stream, shown):
    requests, bar = prepare_upload(adapter_dir, "mine", None, progress, stream)
    assert len(list(requests)) == 5
    assert (bar is not None) == shown
    if bar is not None:
        bar.close()
        last = stream.getvalue().rstrip("\n").split("\r")[-1]
        assert last.startswith("mine [" + "#" * bar.WIDTH + "] 100%")
        assert last.endswith("2.0/2.0 MiB")
    else:
        assert stream.getvalue() == ""
