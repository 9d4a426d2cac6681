"""Two stores on one root, as two replicas would open it: what one publishes or deletes the
other sees (at once on lookup, within one refresh otherwise), version numbers and quotas are
decided under the root's lock, and one starting never removes the other's uploads in flight.

Two `AdapterStore`s in one process exclude each other as two processes do (flock locks open
files); tests/api/test_shared_store.py runs two real servers on one root.
"""

from __future__ import annotations

import threading
import time

import pytest
from tests.adapters.test_store import assert_intact, base, make_publisher  # noqa: F401

from loraserve.adapters.keys import store_key
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.store_watch import StoreWatcher
from loraserve.types import AdapterNotFoundError, QuotaExceededError, TenantQuota


@pytest.fixture
def pair(base, tmp_path):  # noqa: F811
    """Two publishers over one root."""
    return make_publisher(base, tmp_path / "root"), make_publisher(base, tmp_path / "root")


def test_a_publish_is_found_by_the_other_store_at_once(pair, base):  # noqa: F811
    one, other = pair
    first = one.publish_dir("acme", "chat", base.first)
    assert other.store.lookup("acme", "chat") == store_key(first)  # a new name: read on a miss
    second = one.publish_dir("acme", "chat", base.second)
    assert other.store.lookup("acme", "chat", "2") == store_key(second)  # by number: at once
    assert other.store.refresh() == []
    assert other.store.lookup("acme", "chat") == store_key(second)  # latest: after a refresh
    assert [m.version for m in other.store.versions("acme", "chat")] == ["1", "2"]
    assert other.store.refresh() == []  # nothing changed: one small file read


def test_latest_moves_on_the_other_store_at_its_next_refresh(pair, base):  # noqa: F811
    one, other = pair
    one.publish_dir("acme", "chat", base.first)
    assert other.store.lookup("acme", "chat") is not None
    second = one.publish_dir("acme", "chat", base.second)
    assert other.store.resolve("acme", "chat").version == "1"  # not refreshed yet
    other.store.refresh()
    assert other.store.resolve("acme", "chat").version == "2"
    assert other.store.lookup("acme", "chat") == store_key(second)


def test_a_delete_is_never_resolved_again_by_the_other_store(pair, base):  # noqa: F811
    one, other = pair
    first = one.publish_dir("acme", "chat", base.first)
    second = one.publish_dir("acme", "chat", base.second)
    other.store.refresh()
    assert other.store.lookup("acme", "chat") == store_key(second)
    one.store.delete("acme", "chat", "2")
    assert other.store.lookup("acme", "chat", "2") is None  # no refresh needed
    assert other.store.lookup("acme", "chat") == store_key(first)  # latest fell back to 1
    assert other.store.refresh() == [store_key(second)]  # for the caches to drop
    one.store.delete("acme", "chat")
    assert other.store.lookup("acme", "chat") is None
    assert other.store.refresh() == [store_key(first)]
    with pytest.raises(AdapterNotFoundError):
        other.store.resolve("acme", "chat")


def test_a_version_id_published_again_is_a_new_key_on_the_other_store(pair, base):  # noqa: F811
    one, other = pair
    old = one.publish_dir("acme", "chat", base.first, version="exp")
    assert other.store.lookup("acme", "chat", "exp") == store_key(old)
    one.store.delete("acme", "chat")
    new = one.publish_dir("acme", "chat", base.second, version="exp")
    assert store_key(new) != store_key(old)
    assert other.store.lookup("acme", "chat", "exp") == store_key(new)
    with pytest.raises(AdapterNotFoundError, match="replaced"):
        other.store.directory(store_key(old))


def test_concurrent_publishes_from_both_stores_get_distinct_versions(pair, base):  # noqa: F811
    published, errors = [], []

    def publish(publisher, count: int) -> None:
        try:
            for _ in range(count):
                published.append(publisher.publish_dir("acme", "race", base.second))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(p, 4)) for p in (*pair, *pair)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(int(m.version) for m in published) == list(range(1, 17))
    for publisher in pair:
        publisher.store.refresh()
        assert len(publisher.store.versions("acme", "race")) == 16
    for manifest in published:
        assert_intact(pair[0].store, manifest.ref)


def test_quotas_count_what_the_other_store_published(pair, base):  # noqa: F811
    one, other = pair
    one.publish_dir("acme", "a", base.second)
    quota = TenantQuota(max_versions=1)
    with (
        pytest.raises(QuotaExceededError, match="max_versions"),
        other.staging("acme", "b", quota=quota) as upload,
    ):
        for filename in ("adapter_config.json", "adapter_model.safetensors"):
            upload.write(filename, (base.second / filename).read_bytes())
        upload.commit()  # the index had not seen "a"; placing caught up under the lock


def test_starting_a_store_keeps_a_live_one_s_uploads_and_removes_a_dead_one_s(
    base,  # noqa: F811
    tmp_path,
):
    root = tmp_path / "root"
    live = make_publisher(base, root).store
    dead = AdapterStore(root)
    in_flight, left = live.staging_directory(), dead.staging_directory()
    dead.close()  # as a crash would: its lock is gone, its upload left behind
    AdapterStore(root)
    assert in_flight.is_dir() and not left.exists()
    assert [p.name for p in (root / ".staging").iterdir()] == [in_flight.name]


def test_the_watcher_drops_what_another_store_deleted(pair, base):  # noqa: F811
    one, other = pair
    manifest = one.publish_dir("acme", "chat", base.first)
    assert other.store.lookup("acme", "chat") == store_key(manifest)
    forgotten = []
    seen = threading.Event()

    def forget(key) -> None:
        forgotten.append(key)
        seen.set()

    watcher = StoreWatcher(other.store, forget, 0.02)
    watcher.start()
    try:
        started = time.monotonic()
        one.store.delete("acme", "chat")
        assert seen.wait(30), "the watcher never reported the delete"
        assert time.monotonic() - started < 30
    finally:
        watcher.stop()
    assert forgotten == [store_key(manifest)]


def test_a_delete_takes_the_versions_the_other_store_just_published(pair, base):  # noqa: F811
    one, other = pair
    first = one.publish_dir("acme", "chat", base.first)
    assert other.store.lookup("acme", "chat") == store_key(first)
    second = one.publish_dir("acme", "chat", base.second)  # not in the other's index yet
    assert other.store.delete("acme", "chat") == [first, second]
    assert one.store.lookup("acme", "chat") is None
