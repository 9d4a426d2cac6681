"""Two real server processes on one adapter store root, as two replicas on a shared volume:
an upload through one is served by the other within the documented bound, concurrent uploads
through both get distinct versions and none is lost, a delete through one stops new requests
on both at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tests.api.server_process import running_server

from loraserve_client import Client, NotFound

pytestmark = pytest.mark.slow  # real server processes

REFRESH_MS = 200  # --store-refresh-ms: the documented bound for `latest` to move
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def replicas(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-store")
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--device-slots", "2",
        "--adapter-dir", str(root / "store"), "--store-refresh-ms", str(REFRESH_MS),
    ]  # fmt: skip
    with (
        running_server(*flags, log_path=root / "one.log") as (one, _),
        running_server(*flags, log_path=root / "two.log") as (two, _),
    ):
        yield one, two


def client(address: str) -> Client:
    return Client(address, timeout=60)


def tokens(address: str, **adapter) -> list[int]:
    with client(address) as c:
        return c.generate(PROMPT, max_new_tokens=6, **adapter).token_ids


def wait_until_served(address: str, name: str, version: str, bound_s: float) -> float:
    """Seconds until `address` resolves `name`'s latest to `version` (fails past `bound_s`)."""
    started = time.monotonic()
    with client(address) as c:
        while c.get_adapter(name).version != version:
            assert time.monotonic() - started < bound_s, f"{name}@{version} never visible"
            time.sleep(REFRESH_MS / 1000 / 10)
    return time.monotonic() - started


def test_an_upload_through_one_is_served_by_the_other(replicas, adapter_dirs):
    one, two = replicas
    with client(one) as c:
        assert c.upload_adapter(adapter_dirs["llama"]["r8-all"], "sql", progress=False).version
    served = tokens(two, adapter="sql")  # a new name: found at once, no refresh needed
    assert served == tokens(one, adapter="sql") != tokens(two)
    with client(one) as c:
        second = c.upload_adapter(adapter_dirs["llama"]["r4-attn"], "sql", progress=False)
    assert tokens(two, adapter="sql", version=second.version) == tokens(one, adapter="sql")
    # `latest` moves within one refresh; the margin is for a busy 2-core machine
    waited = wait_until_served(two, "sql", second.version, bound_s=REFRESH_MS / 1000 + 10)
    print(f"figure: latest moved on the other replica after {waited * 1000:.0f} ms")
    assert tokens(two, adapter="sql") == tokens(one, adapter="sql", version=second.version)
    with client(one) as c:
        c.delete_adapter("sql")


def test_concurrent_uploads_through_both_never_collide(replicas, adapter_dirs):
    source: Path = adapter_dirs["llama"]["r1-qv"]
    versions, errors = [], []

    def upload(address: str) -> None:
        try:
            with client(address) as c:
                for _ in range(3):
                    versions.append(c.upload_adapter(source, "race", progress=False).version)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(a,)) for a in (*replicas, *replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(map(int, versions)) == list(range(1, 13))
    for address in replicas:
        wait_until_served(address, "race", "12", bound_s=REFRESH_MS / 1000 + 10)
        with client(address) as c:
            listed = [a.version for a in c.list_adapters() if a.name == "race"]
        assert sorted(map(int, listed)) == list(range(1, 13))
    with client(replicas[0]) as c:
        c.delete_adapter("race")


def test_a_delete_through_one_stops_new_requests_on_both(replicas, adapter_dirs):
    one, two = replicas
    with client(one) as c:
        c.upload_adapter(adapter_dirs["llama"]["r8-all"], "gone", progress=False)
    expected = tokens(one, adapter="gone")
    assert tokens(two, adapter="gone") == expected  # now in the other's device slot
    with client(two) as c:
        assert c.delete_adapter("gone") == ["1"]
    for address in replicas:  # at once: no refresh, no wait
        with client(address) as c, pytest.raises(NotFound):
            c.generate(PROMPT, adapter="gone", max_new_tokens=6)
