"""Promises: adapter_config.json is checked against a closed schema before anything uses it
(finite, bounded numbers in every field and every rank_pattern / alpha_pattern value, the right
types, bounded nesting, pattern keys RE2 accepts), and weights that are not finite once the
scaling is folded in are refused at upload. Every refusal is INVALID_ARGUMENT naming the field,
stores nothing, and leaves the server serving."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from safetensors.torch import load, save
from tests.reliability.helpers import (
    CONFIG,
    WEIGHTS,
    adapter_files,
    health_latency,
    metadata,
    refusal,
    upload,
    with_config,
)

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc


def setting(**values):
    """A change to the config's text: these keys set to these values."""
    return lambda text: json.dumps({**json.loads(text), **values})


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


DEEP = "[" * 100_000 + "]" * 100_000
CASES = {
    # name: (change to the config's text, words of the refusal)
    "nan-alpha": (setting(lora_alpha=float("nan")), ["NaN or Infinity", "finite"]),
    "infinite-alpha": (setting(lora_alpha=float("inf")), ["NaN or Infinity"]),
    "alpha-beyond-float-range": (
        lambda text: text.replace('"lora_alpha": 8.0', '"lora_alpha": 1e400'),
        ["beyond the float range"],
    ),
    "huge-alpha": (setting(lora_alpha=1e30), ["lora_alpha: must be a finite number", "1e+30"]),
    "negative-alpha": (setting(lora_alpha=-1.0), ["lora_alpha: must be a finite number above 0"]),
    "huge-negative-alpha-pattern": (
        setting(alpha_pattern={"q_proj": -1e30}),
        ["alpha_pattern.q_proj: must be a finite number above 0", "-1e+30"],
    ),
    "nan-alpha-pattern": (setting(alpha_pattern={"q_proj": float("nan")}), ["NaN or Infinity"]),
    "huge-rank-pattern": (setting(rank_pattern={"q_proj": 10**30}), ["rank_pattern.q_proj"]),
    "fractional-rank-pattern": (
        setting(rank_pattern={"q_proj": 2.5}),
        ["rank_pattern.q_proj: must be a whole number"],
    ),
    "alpha-pattern-as-list": (setting(alpha_pattern=["q_proj"]), ["alpha_pattern", "dictionary"]),
    "alpha-pattern-as-string": (setting(alpha_pattern="q_proj"), ["alpha_pattern"]),
    "rank-as-string": (setting(r="4"), ["r: must be a whole number", "'4'"]),
    "pattern-with-backreference": (
        setting(alpha_pattern={r"(q)\1_proj": 2.0}),
        ["alpha_pattern", "refused by RE2", "backreferences"],
    ),
    "pattern-with-look-ahead": (
        setting(rank_pattern={"(?=q)q_proj": 4}),
        ["rank_pattern", "refused by RE2"],
    ),
    "pattern-that-does-not-parse": (
        setting(alpha_pattern={"q_proj(": 2.0}),
        ["alpha_pattern", "refused by RE2", "missing )"],
    ),
    "pattern-key-too-long": (
        setting(alpha_pattern={"q" * 300: 2.0}),
        ["alpha_pattern", "at most 256 characters"],
    ),
    "too-many-pattern-keys": (
        setting(alpha_pattern={f"layers.{i}.q_proj": 2.0 for i in range(2000)}),
        ["alpha_pattern", "at most 1024 items"],
    ),
    "deeply-nested": (
        lambda text: text.replace('"eva_config": null', f'"eva_config": {DEEP}'),
        ["nested too deeply"],
    ),
    "nested-past-the-schema-depth": (
        setting(eva_config={"a": nested(20)}),
        ["nested more than 16 levels"],
    ),
    "unknown-key": (setting(surprise=1), ["unknown keys ['surprise']"]),
    "long-text": (setting(base_model_name_or_path="m" * 5000), ["base_model_name_or_path"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_values_outside_the_schema_are_refused(server, case):
    change, words = CASES[case]
    files = adapter_files(server.adapter)
    files = {**files, CONFIG: change(files[CONFIG].decode()).encode()}
    assert files[CONFIG] != adapter_files(server.adapter)[CONFIG], "the case changed nothing"
    started = time.perf_counter()
    error = refusal(lambda: upload(server, "alpha-key", f"cfg-{case}", files))
    elapsed = time.perf_counter() - started
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    for word in words:
        assert word in error.details(), f"{word!r} not in {error.details()!r}"
    assert len(error.details()) < 2500 and "Traceback" not in error.details()
    assert elapsed < 10, f"refusing took {elapsed:.1f}s"
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        listed = stub.ListAdapters(apb.ListAdaptersRequest(), metadata=metadata("alpha-key"))
        assert f"cfg-{case}" not in {a.name for a in listed.adapters}
        assert health_latency(channel) < 5


def test_the_unedited_adapter_and_peft_patterns_are_accepted(server):
    """The control: the same files pass, and so do RE2-compatible PEFT patterns."""
    files = adapter_files(server.adapter)
    assert upload(server, "alpha-key", "cfg-control", files).adapter.version == "1"
    patterns = {
        "rank_pattern": {"q_proj": 4, r"layers\.[01]\.self_attn\.v_proj": 4},
        "alpha_pattern": {"(?:(?:.*)*)*x": 2.0, "layers.1.self_attn.(k|o)_proj": 16.0},
    }
    patterned = with_config(files, lambda config: config.update(patterns))
    assert upload(server, "alpha-key", "cfg-patterns", patterned).adapter.lora_alpha == 8.0


def test_weights_that_overflow_once_scaled_are_refused(server):
    files = adapter_files(server.adapter)
    tensors = load(files[WEIGHTS])
    name = next(n for n in tensors if "q_proj.lora_B" in n)
    tensors[name] = torch.full_like(tensors[name], 3e34)  # finite, as stored
    loud = {**files, WEIGHTS: save(tensors, metadata={"format": "pt"})}
    overflowing = with_config(loud, lambda config: config.update(lora_alpha=65536.0))
    # scale 65536 / 4 = 16384: 3e34 * 16384 = 4.9e38, over float32's 3.4e38

    error = refusal(lambda: upload(server, "alpha-key", "cfg-overflow", overflowing))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "self_attn.q_proj: weights are not finite" in error.details()
    assert "once scaled by 16384" in error.details()
    assert upload(server, "alpha-key", "cfg-loud-but-finite", loud).adapter.version == "1"
