"""Adapters over real gRPC: upload -> generate -> delete, pages, auth, bad uploads, pins, rich
errors (tenancy and the queue's bound are in tests/reliability)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tests.api.server_process import running_server
from tests.engine.helpers import make_core, run

from loraserve.types import GenerateRequest, SamplingParams
from loraserve_client import (
    Client,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc

pytestmark = pytest.mark.slow  # real server processes

KEYS = {
    "alpha-key": {"tenant": "alpha", "scopes": ["generate", "adapters:write"]},
    "beta-key": {"tenant": "beta", "scopes": ["generate", "adapters:write"]},
    "reader-key": {"tenant": "alpha", "scopes": ["generate"]},
    "ops-key": {"tenant": "alpha", "scopes": ["admin"]},
}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-server")
    keys_file = root / "keys.json"
    keys_file.write_text(
        json.dumps({"keys": [{"key": key, **entry} for key, entry in KEYS.items()]})
    )
    store = root / "store"
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--api-keys", str(keys_file),
        "--adapter-dir", str(store), "--max-upload-bytes", str(4 * 1024 * 1024),
        "--device-slots", "2",
    ]  # fmt: skip
    with running_server(*flags, log_path=root / "server.log") as (address, _):
        yield address, store


def client(server, key: str | None) -> Client:
    return Client(server[0], api_key=key, timeout=60)


def stored_versions(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.glob("*/*/versions/*") if p.is_dir())


def expected_tokens(model_dirs, adapter_dir: Path | None) -> list[int]:
    core = make_core(model_dirs["llama"])
    name = None
    if adapter_dir is not None:
        name = "x"
        core.adapters.load(name, adapter_dir)
    request = GenerateRequest(
        prompt=PROMPT, adapter=name, sampling=SamplingParams(max_new_tokens=6)
    )
    return run(core, {0: [request]})[0].tokens


def test_upload_generate_delete_round_trip(server, model_dirs, adapter_dirs):
    source = adapter_dirs["llama"]["r8-all"]
    with client(server, "alpha-key") as alpha:
        uploaded = alpha.upload_adapter(source, "sql", progress=False)
        assert (uploaded.tenant, uploaded.name, uploaded.version) == ("alpha", "sql", "1")
        assert uploaded.rank == 8 and "q_proj" in uploaded.target_modules
        got = alpha.generate(PROMPT, adapter="sql", max_new_tokens=6)
        assert got.token_ids == expected_tokens(model_dirs, source)
        assert got.token_ids != expected_tokens(model_dirs, None)
        second = alpha.upload_adapter(adapter_dirs["llama"]["r4-attn"], "sql", progress=False)
        assert second.version == "2"
        latest = alpha.generate(PROMPT, adapter="sql", max_new_tokens=6)
        assert latest.token_ids == expected_tokens(model_dirs, adapter_dirs["llama"]["r4-attn"])
        pinned_v1 = alpha.generate(PROMPT, adapter="sql", version="1", max_new_tokens=6)
        assert pinned_v1.token_ids == got.token_ids
        assert alpha.delete_adapter("sql") == ["1", "2"]
        with pytest.raises(NotFound):
            alpha.generate(PROMPT, adapter="sql", max_new_tokens=6)
        with pytest.raises(NotFound):
            alpha.get_adapter("sql")
    assert stored_versions(server[1]) == []


def test_list_pagination(server, adapter_dirs):
    with client(server, "alpha-key") as alpha:
        for name in ("p1", "p2", "p3"):
            alpha.upload_adapter(adapter_dirs["llama"]["r1-qv"], name, progress=False)
        page, token = alpha.list_adapters_page(page_size=2, page_token="")
        assert [a.name for a in page] == ["p1", "p2"] and token
        rest, end = alpha.list_adapters_page(page_size=2, page_token=token)
        assert [a.name for a in rest] == ["p3"] and end == ""
        assert [a.name for a in alpha.list_adapters(page_size=1)] == ["p1", "p2", "p3"]
        for name in ("p1", "p2", "p3"):
            alpha.delete_adapter(name)


def test_keys_and_scopes(server, adapter_dirs):
    for key in (None, "wrong-key"):
        with client(server, key) as anonymous, pytest.raises(Unauthenticated):
            anonymous.generate(PROMPT, max_new_tokens=2)
    with client(server, "reader-key") as reader:
        assert reader.generate(PROMPT, max_new_tokens=2).completion_tokens == 2
        with pytest.raises(PermissionDenied):
            reader.upload_adapter(adapter_dirs["llama"]["r1-qv"], "nope", progress=False)
    with client(server, "ops-key") as ops, pytest.raises(PermissionDenied):
        ops.generate(PROMPT, max_new_tokens=2)
    with client(server, None) as anonymous:
        assert anonymous.health() == "SERVING"  # health needs no key


def upload_messages(directory: Path, name: str, *, sha=None, sizes=None, cut=0):
    files = {
        f: (directory / f).read_bytes()
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    yield apb.UploadAdapterRequest(
        header=apb.UploadHeader(
            name=name,
            files=[
                apb.AdapterFile(
                    filename=f,
                    sha256=(sha or {}).get(f, hashlib.sha256(data).hexdigest()),
                    size_bytes=(sizes or {}).get(f, len(data)),
                )
                for f, data in files.items()
            ],
        )
    )
    for f, data in files.items():
        data = data[: len(data) - cut] if f.endswith("safetensors") else data
        for start in range(0, len(data), 1 << 20):
            chunk = apb.FileChunk(filename=f, data=data[start : start + (1 << 20)])
            yield apb.UploadAdapterRequest(chunk=chunk)


def bad_upload_cases(source: Path, tmp: Path):
    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copy(source / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    weights = "adapter_model.safetensors"

    def pickle_upload():
        config = (pickled / "adapter_config.json").read_bytes()
        blob = (pickled / "adapter_model.bin").read_bytes()
        entries = {"adapter_config.json": config, "adapter_model.bin": blob}
        yield apb.UploadAdapterRequest(
            header=apb.UploadHeader(
                name="pickled",
                files=[
                    apb.AdapterFile(
                        filename=f, sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d)
                    )
                    for f, d in entries.items()
                ],
            )
        )

    return {
        "bad checksum": (upload_messages(source, "c1", sha={weights: "0" * 64}),
                         grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
        "truncated": (upload_messages(source, "c2", cut=100), grpc.StatusCode.INVALID_ARGUMENT,
                      "truncated"),
        "oversized": (upload_messages(source, "c3", sizes={weights: 64 * 1024 * 1024}),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds"),
        "pickle": (pickle_upload(), grpc.StatusCode.INVALID_ARGUMENT, "safetensors"),
        "traversal": (upload_messages(source, "../escape"), grpc.StatusCode.INVALID_ARGUMENT,
                      "adapter name"),
        "no header": (iter([apb.UploadAdapterRequest(chunk=apb.FileChunk(filename="x"))]),
                      grpc.StatusCode.INVALID_ARGUMENT, "header"),
    }  # fmt: skip


def test_bad_uploads_get_their_status_and_store_nothing(server, adapter_dirs, tmp_path):
    before = stored_versions(server[1])
    cases = bad_upload_cases(adapter_dirs["llama"]["r8-all"], tmp_path)
    metadata = (("authorization", "Bearer alpha-key"),)
    with grpc.insecure_channel(server[0]) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        for case, (messages, code, words) in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.UploadAdapter(messages, metadata=metadata, timeout=60)
            assert caught.value.code() == code, (case, caught.value.details())
            assert words in caught.value.details(), (case, caught.value.details())
    assert stored_versions(server[1]) == before
    assert not any((server[1] / ".staging").iterdir())
    assert not (tmp_path.parent / "escape").exists()


def test_operators_prefetch_and_pin_a_tenants_adapter(server, adapter_dirs):
    with client(server, "alpha-key") as alpha, client(server, "ops-key") as ops:
        alpha.upload_adapter(adapter_dirs["llama"]["r4-attn"], "hot", progress=False)
        with pytest.raises(PermissionDenied):
            alpha.pin_adapter("hot")
        assert ops.prefetch_adapter("hot") in ("host", "device")
        assert ops.pin_adapter("hot") is True
        assert alpha.get_adapter("hot").pinned is True
        deadline = time.monotonic() + 30
        while alpha.get_adapter("hot").residency != "device" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alpha.get_adapter("hot").residency == "device"
        for name in ("warm", "cold"):
            alpha.upload_adapter(adapter_dirs["llama"]["r1-qv"], name, progress=False)
        assert ops.pin_adapter("warm") is True  # both device slots are pinned now
        with pytest.raises(ResourceExhausted, match="no device slot is free") as full:
            ops.pin_adapter("cold")
        assert full.value.retry_after == 1.0  # through the error table: RetryInfo and trailer
        assert alpha.get_adapter("cold").pinned is False
        for name in ("hot", "warm"):
            assert ops.pin_adapter(name, pinned=False) is False
            assert alpha.get_adapter(name).pinned is False
        assert ops.pin_adapter("cold") is True
        assert ops.pin_adapter("cold", pinned=False) is False
        with pytest.raises(NotFound):
            ops.prefetch_adapter("no-such-adapter")
        for name in ("hot", "warm", "cold"):
            alpha.delete_adapter(name)


def test_errors_carry_rich_details_where_they_help(server, adapter_dirs, tmp_path):
    """A refused adapter lists every problem as a BadRequest field violation."""
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["llama"]["r8-all"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], surprise_key=1)
    (broken / "adapter_config.json").write_text(json.dumps(config))
    metadata = (("authorization", "Bearer alpha-key"),)
    with grpc.insecure_channel(server[0]) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadAdapter(upload_messages(broken, "rich"), metadata=metadata, timeout=60)
    status = rpc_status.from_call(caught.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    descriptions = " | ".join(v.description for v in bad_request.field_violations)
    assert "modules_to_save" in descriptions and "surprise_key" in descriptions
    assert len(bad_request.field_violations) >= 2
