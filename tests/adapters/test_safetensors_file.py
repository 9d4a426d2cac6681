"""The safetensors reader against safetensors' own, and against files a hostile tenant writes:
every malformed header entry is refused as InvalidAdapterError naming the tensor, never read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.safetensors_file import read_safetensors, safetensors_header
from loraserve.types import InvalidAdapterError


def _write(path: Path, header: dict, data: bytes, pad_to: int = 1) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_reads_what_safetensors_wrote_as_safetensors_reads_it(tmp_path):
    tensors = {
        "a": torch.randn(16, 64),
        "b": torch.randn(64, 16).to(torch.bfloat16),
        "c": torch.randn(3).to(torch.float16),
        "empty": torch.zeros(0, 5),
        "n": torch.arange(7, dtype=torch.int64),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    got, want = read_safetensors(path), load_file(path)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def test_a_tensor_at_an_unaligned_offset_is_read_whole(tmp_path):
    """An f16 tensor of 3 values puts the next f32 tensor at byte 6: it is copied, then viewed."""
    half, full = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.tensor([4.0, 5.0])
    header = {
        "h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]},
    }
    data = half.numpy().tobytes() + full.numpy().tobytes()
    got = read_safetensors(_write(tmp_path / "w.safetensors", header, data))
    assert torch.equal(got["h"], half) and torch.equal(got["f"], full)


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("entry", "data", "problem"),
    [
        ({**ENTRY, "dtype": "F8_E9"}, 16, "dtype 'F8_E9' is unknown"),
        ({**ENTRY, "dtype": ["F32"]}, 16, "is unknown"),
        ({**ENTRY, "shape": [2, -2]}, 16, "shape is not a list of sizes"),
        ({**ENTRY, "shape": [True, 2]}, 16, "shape is not a list of sizes"),
        ({**ENTRY, "shape": "2x2"}, 16, "shape is not a list of sizes"),
        ({**ENTRY, "data_offsets": [0]}, 16, "data_offsets is not [begin, end]"),
        ({**ENTRY, "data_offsets": [0, 2**70]}, 16, "does not match its shape"),
        ({**ENTRY, "data_offsets": [0, 12]}, 16, "does not match its shape"),
        ({**ENTRY, "data_offsets": [4, 20]}, 20, "does not start where the last ended"),
        (ENTRY, 24, "8 bytes after the last tensor"),
        ([1, 2], 16, "its entry is not an object"),
    ],
)
def test_a_malformed_entry_is_refused_naming_it(tmp_path, entry, data, problem):
    path = _write(tmp_path / "w.safetensors", {"lora_A.weight": entry}, bytes(data))
    with pytest.raises(InvalidAdapterError) as caught:
        read_safetensors(path)
    assert problem in str(caught.value)
    assert "lora_A.weight" in str(caught.value) or "after the last" in problem


def test_a_file_shorter_than_its_header_says_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidAdapterError, match="header claims 1000 bytes of a 10 byte file"):
        read_safetensors(path)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(InvalidAdapterError, match="too short"):
        safetensors_header(path)
