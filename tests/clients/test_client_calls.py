"""Client calls against in-process fakes and a dead port: metadata and deadlines on every call,
retries only where they are safe, typed errors with their hints, and the adapter methods."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from tests.api.server_process import free_port
from tests.clients.fakes import Behaviour, fake_server, write_adapter_dir

from loraserve_client import (
    Adapter,
    AsyncClient,
    Backoff,
    Client,
    DeadlineExceeded,
    Finished,
    GenerateOptions,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from loraserve_client.cli import main
from loraserve_client.upload import WEIGHTS_FILE


def within(time_remaining: float | None, timeout: float) -> bool:
    """Whether a deadline seen by the server came from `timeout` (the wire rounds it up a bit)."""
    return time_remaining is not None and timeout - 1 < time_remaining <= timeout + 0.1


def test_every_call_carries_the_api_key_and_a_deadline(tmp_path):
    behaviour = Behaviour()
    adapter_dir = write_adapter_dir(tmp_path / "a", b"weights")
    with fake_server(behaviour) as address, Client(address, "secret", timeout=7) as client:
        client.health()
        client.server_info()
        client.generate("x", timeout=2)
        assert list(client.generate_stream("x"))[-1] == Finished("eos", 0, 0)
        client.upload_adapter(adapter_dir, "a", progress=False)
        client.list_adapters()
        client.get_adapter("a")
        client.prefetch_adapter("a")
        client.pin_adapter("a")
        client.delete_adapter("a")
        with Client(address, timeout=7) as anonymous:
            anonymous.health()
    calls = behaviour.calls
    assert [c.method for c in calls] == [
        "Check",
        "GetServerInfo",
        "Generate",
        "GenerateStream",
        "UploadAdapter",
        "ListAdapters",
        "GetAdapter",
        "PrefetchAdapter",
        "PinAdapter",
        "DeleteAdapter",
        "Check",
    ]
    assert all(c.metadata["authorization"] == "Bearer secret" for c in calls[:-1])
    assert "authorization" not in calls[-1].metadata
    assert within(calls[2].time_remaining, 2)
    assert all(within(c.time_remaining, 7) for c in calls if c.method != "Generate")


async def test_async_calls_carry_the_api_key_and_a_deadline():
    behaviour = Behaviour()
    with fake_server(behaviour) as address:
        async with AsyncClient(address, "secret", timeout=7) as client:
            assert await client.health() == "SERVING"
            assert (await client.server_info())["base_model"] == "fake"
            assert (await client.generate("x", timeout=2)).text == "hi"
            assert [e async for e in client.generate_stream("x")][-1] == Finished("eos", 0, 0)
    assert behaviour.methods() == ["Check", "GetServerInfo", "Generate", "GenerateStream"]
    assert all(c.metadata["authorization"] == "Bearer secret" for c in behaviour.calls)
    assert within(behaviour.calls[2].time_remaining, 2)
    assert within(behaviour.calls[0].time_remaining, 7)


async def test_generate_options_reach_the_wire_from_every_way_in(capsys):
    """A GenerateOptions, keywords over it, the async client and the CLI send the same input."""
    behaviour = Behaviour()
    options = GenerateOptions(adapter="sql", max_new_tokens=9, stop=("\n",), ignore_eos=True)
    with fake_server(behaviour) as address:
        with Client(address) as client:
            client.generate("x", options)
            list(client.generate_stream("x", options, max_new_tokens=3))
            client.generate("x", adapter="sql", ignore_eos=True)
        async with AsyncClient(address) as async_client:
            await async_client.generate("x", options)
            [e async for e in async_client.generate_stream("x", ignore_eos=True)]
        argv = ["generate", "x", "--adapter", "sql", "--ignore-eos", "--server", address]
        assert main([*argv, "--max-new-tokens", "9", "--stop", "\n"]) == 0
        assert capsys.readouterr().out == "hi\n"
    inputs = behaviour.inputs
    sent = [(i.adapter.name, i.max_new_tokens, list(i.stop), i.ignore_eos) for i in inputs]
    assert sent == [
        ("sql", 9, ["\n"], True),
        ("sql", 3, ["\n"], True),
        ("sql", 0, [], True),
        ("sql", 9, ["\n"], True),
        ("", 0, [], True),
        ("sql", 9, ["\n"], True),
    ]


FAST = Backoff(initial=0.01, maximum=0.02)


@pytest.mark.parametrize(
    ("failures", "retries", "attempts", "serving"),
    [(0, 3, 1, True), (2, 3, 3, True), (3, 3, 4, True), (5, 3, 4, False), (1, 0, 1, False)],
)
def test_health_retries_unavailable_as_often_as_allowed(failures, retries, attempts, serving):
    behaviour = Behaviour(health_failures=failures)
    with fake_server(behaviour) as address:
        client = Client(address, retries=retries, backoff=FAST)
        if serving:
            assert client.health() == "SERVING"
        else:
            with pytest.raises(Unavailable, match="warming up"):
                client.health()
        client.close()
    assert behaviour.methods() == ["Check"] * attempts


async def test_async_health_retries_unavailable_too():
    behaviour = Behaviour(health_failures=2)
    with fake_server(behaviour) as address:
        async with AsyncClient(address, retries=2, backoff=FAST) as client:
            assert await client.health() == "SERVING"
    assert behaviour.methods() == ["Check"] * 3


def test_retries_stop_at_the_deadline():
    behaviour = Behaviour(health_failures=5)
    backoff = Backoff(initial=30.0, maximum=30.0)
    with fake_server(behaviour) as address:
        client = Client(address, timeout=1, backoff=backoff)
        with pytest.raises((Unavailable, DeadlineExceeded)):
            client.health()
        client.close()
    assert len(behaviour.methods()) < 5


def test_generate_is_never_retried_and_capacity_errors_carry_the_hint():
    behaviour = Behaviour(
        generate_error=(grpc.StatusCode.UNAVAILABLE, "draining", ()),
    )
    with fake_server(behaviour) as address, Client(address, backoff=FAST) as client:
        with pytest.raises(Unavailable, match="draining"):
            client.generate("x")
        behaviour.generate_error = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "queue full",
            (("grpc-retry-pushback-ms", "1500"),),
        )
        with pytest.raises(ResourceExhausted) as caught:
            client.generate("x")
    assert caught.value.retry_after == 1.5
    assert caught.value.details == "queue full"
    assert behaviour.methods() == ["Generate", "Generate"]


async def test_async_capacity_error_carries_the_hint():
    behaviour = Behaviour(
        generate_error=(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "250"),))
    )
    with fake_server(behaviour) as address:
        async with AsyncClient(address) as client:
            with pytest.raises(ResourceExhausted) as caught:
                await client.generate("x")
    assert caught.value.retry_after == 0.25


def test_nothing_listening_every_call_ends_unavailable():
    address = f"127.0.0.1:{free_port()}"
    with Client(address, retries=2, backoff=FAST) as client:
        with pytest.raises(Unavailable):
            client.health()
        with pytest.raises(Unavailable):
            client.generate("x")
        with pytest.raises(Unavailable):
            client.delete_adapter("x")


async def test_async_nothing_listening_every_call_ends_unavailable():
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, retries=2, backoff=FAST) as client:
        with pytest.raises(Unavailable):
            await client.server_info()
        with pytest.raises(Unavailable):
            await client.generate("x")


def test_adapter_methods_return_plain_values(tmp_path):
    weights = bytes(range(256)) * 9000  # 2.2 MiB: three chunks
    behaviour = Behaviour()
    with fake_server(behaviour) as address, Client(address) as client:
        first = client.upload_adapter(write_adapter_dir(tmp_path / "a", weights), "a")
        for name in ("a", "b", "c"):
            client.upload_adapter(write_adapter_dir(tmp_path / name, b"w" + name.encode()), name)
        listed = client.list_adapters(page_size=2)
        page, token = client.list_adapters_page(page_size=3)
        latest = client.get_adapter("a")
        with pytest.raises(NotFound, match="'zz'"):
            client.get_adapter("zz")
        assert client.prefetch_adapter("a") == "device"
        assert client.pin_adapter("a", pinned=False) is False
        assert client.delete_adapter("a") == ["1", "2"]
        assert client.list_adapters() == listed[2:]
    assert behaviour.uploads["a", "1"][WEIGHTS_FILE] == weights
    assert first.version == "1" and first.residency == "disk" and first.create_time is not None
    assert [f.sha256 for f in first.files][1] == hashlib.sha256(weights).hexdigest()
    assert [(a.name, a.version) for a in listed] == [("a", "1"), ("a", "2"), ("b", "1"), ("c", "1")]
    assert behaviour.methods().count("ListAdapters") == 2 + 1 + 1
    assert [a.name for a in page] == ["a", "a", "b"] and token == "3"
    assert latest.version == "2"
    assert isinstance(latest, Adapter) and latest.target_modules == ["q_proj", "v_proj"]


async def test_async_adapter_methods(tmp_path):
    behaviour = Behaviour()
    with fake_server(behaviour) as address:
        async with AsyncClient(address) as client:
            weights = b"\x00" * (3 << 20)
            uploaded = await client.upload_adapter(write_adapter_dir(tmp_path, weights), "a", "7")
            assert await client.list_adapters(page_size=1) == [uploaded]
            assert await client.get_adapter("a", "7") == uploaded
            assert await client.prefetch_adapter("a") == "device"
            assert await client.pin_adapter("a") is True
            assert await client.delete_adapter("a", "7") == ["7"]
            (tmp_path / "pickled").mkdir()
            (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"pickle")
            with pytest.raises(InvalidArgument, match="pickle"):
                await client.upload_adapter(tmp_path / "pickled", "b")
    assert behaviour.uploads["a", "7"][WEIGHTS_FILE] == weights
    assert "UploadAdapter" in behaviour.methods()
    assert isinstance(uploaded, Adapter) and uploaded.version == "7"
