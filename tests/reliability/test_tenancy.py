"""Promises about names across tenants, on every RPC that takes one: another tenant's adapter
is indistinguishable from one that does not exist; a name or version that is not an identifier
is INVALID_ARGUMENT; the operator's shared adapter is visible to every tenant, read-only, and
an admin key can pin it."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from tests.reliability.helpers import (
    SHARED,
    adapter_files,
    generation,
    metadata,
    refusal,
    upload,
    upload_requests,
)

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb

Call = Callable[[str, str, str], object]  # (key, name, version) -> reply


def rpcs(channel: grpc.Channel) -> dict[str, tuple[str, Call]]:
    """Every RPC that names an adapter: the key that may call it, and a call by name."""
    generation_stub = generation_pb2_grpc.GenerationServiceStub(channel)
    adapters = adapters_pb2_grpc.AdapterServiceStub(channel)

    def generate(key: str, name: str, version: str) -> object:
        given = generation("Hello", max_new_tokens=2)
        given.adapter.CopyFrom(gpb.AdapterRef(name=name, version=version))
        return generation_stub.Generate(
            gpb.GenerateRequest(input=given), metadata=metadata(key), timeout=60
        )

    def stream(key: str, name: str, version: str) -> object:
        given = generation("Hello", max_new_tokens=2)
        given.adapter.CopyFrom(gpb.AdapterRef(name=name, version=version))
        request = gpb.GenerateStreamRequest(input=given)
        return list(generation_stub.GenerateStream(request, metadata=metadata(key), timeout=60))

    def unary(method: Callable, message: type) -> Call:
        return lambda key, name, version: method(
            message(name=name, version=version), metadata=metadata(key), timeout=60
        )

    return {
        "Generate": ("beta-key", generate),
        "GenerateStream": ("beta-key", stream),
        "GetAdapter": ("beta-key", unary(adapters.GetAdapter, apb.GetAdapterRequest)),
        "DeleteAdapter": ("beta-key", unary(adapters.DeleteAdapter, apb.DeleteAdapterRequest)),
        "PrefetchAdapter": (
            "beta-admin-key",
            unary(adapters.PrefetchAdapter, apb.PrefetchAdapterRequest),
        ),
        "PinAdapter": ("beta-admin-key", unary(adapters.PinAdapter, apb.PinAdapterRequest)),
    }


def test_another_tenants_adapter_is_not_found_exactly_like_a_missing_one(server):
    files = adapter_files(server.adapter)
    upload(server, "alpha-key", "secret", files)
    with grpc.insecure_channel(server.address) as channel:
        for method, (key, call) in rpcs(channel).items():
            for version in ("", "1"):
                theirs = refusal(call, key, "secret", version)
                missing = refusal(call, key, "never-was", version)
                assert theirs.code() == missing.code() == grpc.StatusCode.NOT_FOUND, method
                assert theirs.details().replace("secret", "never-was") == missing.details()
        adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
        listing = adapters.ListAdapters(
            apb.ListAdaptersRequest(), metadata=metadata("beta-key"), timeout=30
        )
        assert "secret" not in [a.name for a in listing.adapters]
        ours = upload(server, "beta-key", "secret", files).adapter  # beta's own, alongside
        assert (ours.tenant, ours.version) == ("beta", "1")
        theirs = adapters.GetAdapter(
            apb.GetAdapterRequest(name="secret"), metadata=metadata("alpha-key"), timeout=30
        )
        assert theirs.adapter.tenant == "alpha"
        for key in ("beta-key", "alpha-key"):
            request = apb.DeleteAdapterRequest(name="secret")
            assert adapters.DeleteAdapter(request, metadata=metadata(key), timeout=30)


BAD_NAMES = ["../evil", "a/b", ".hidden", "a..b", "x" * 65, "ü", "sp ace"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_name_that_is_not_an_identifier_is_invalid_argument_everywhere(server, bad):
    files = adapter_files(server.adapter)
    with grpc.insecure_channel(server.address) as channel:
        for method, (key, call) in rpcs(channel).items():
            for name, version in ((bad, ""), ("fine", bad)):
                error = refusal(call, key, name, version)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                assert "is not a valid identifier" in error.details(), method
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        for name, version in ((bad, ""), ("fine", bad)):
            requests = upload_requests(name, files, version)
            error = refusal(stub.UploadAdapter, requests, metadata=metadata("beta-key"), timeout=60)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert not (server.store.parent / "evil").exists()


def test_the_shared_adapter_is_visible_read_only_and_pinnable_by_an_admin(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        for key in ("alpha-key", "beta-key", "beta-admin-key"):
            got = stub.GetAdapter(
                apb.GetAdapterRequest(name=SHARED), metadata=metadata(key), timeout=30
            ).adapter
            assert (got.name, got.shared, got.tenant, got.version, got.rank) == (
                SHARED, True, "", "", 8,
            )  # fmt: skip
            assert {f.filename for f in got.files} == {
                "adapter_config.json",
                "adapter_model.safetensors",
            }
            listed, token = [], ""
            while True:  # one adapter a page: the shared one follows the tenant's own
                page = stub.ListAdapters(
                    apb.ListAdaptersRequest(page_size=1, page_token=token),
                    metadata=metadata(key),
                    timeout=30,
                )
                assert len(page.adapters) <= 1
                listed += page.adapters
                token = page.next_page_token
                if not token:
                    break
            assert [a.name for a in listed if a.shared] == [SHARED]
            assert listed[-1].name == SHARED
        error = refusal(
            lambda: stub.DeleteAdapter(
                apb.DeleteAdapterRequest(name=SHARED), metadata=metadata("alpha-key"), timeout=30
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "shared" in error.details() and "read-only" in error.details()
        error = refusal(
            lambda: stub.PinAdapter(
                apb.PinAdapterRequest(name=SHARED, pinned=True),
                metadata=metadata("alpha-key"),
                timeout=30,
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # no admin scope
        admin = metadata("beta-admin-key")
        pinned = stub.PinAdapter(
            apb.PinAdapterRequest(name=SHARED, pinned=True), metadata=admin, timeout=60
        )
        assert pinned.pinned
        deadline = time.monotonic() + 60
        while True:  # pinned at once; resident once its load into the slot is done
            got = stub.GetAdapter(apb.GetAdapterRequest(name=SHARED), metadata=admin, timeout=30)
            assert got.adapter.pinned
            if got.adapter.residency == apb.RESIDENCY_DEVICE:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        unpinned = stub.PinAdapter(
            apb.PinAdapterRequest(name=SHARED, pinned=False), metadata=admin, timeout=60
        )
        assert not unpinned.pinned
        generation_stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = generation_stub.Generate(
            gpb.GenerateRequest(input=generation("Shared", SHARED, 3)),
            metadata=metadata("beta-key"),
            timeout=60,
        )
        assert reply.usage.completion_tokens == 3
