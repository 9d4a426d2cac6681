"""The demo in the user's cache: trained once, reused, retrained on request, never half there."""

from __future__ import annotations

import logging
import threading

import pytest
from tests.demo.test_training import SMALL

from loraserve.demo import REPORT, demo_dir, demo_model
from loraserve.demo.language import ADAPTERS

BUILD_LINE = "training the demo model and adapters"


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def builds(caplog) -> int:
    return sum(BUILD_LINE in record.getMessage() for record in caplog.records)


def test_trained_once_then_reused(caplog):
    caplog.set_level(logging.INFO, logger="loraserve.demo")
    first = demo_model(recipe=SMALL)
    report = (demo_dir(SMALL) / REPORT).stat().st_mtime_ns
    assert demo_model(recipe=SMALL) == first
    assert builds(caplog) == 1
    assert (demo_dir(SMALL) / REPORT).stat().st_mtime_ns == report
    assert (first.base / "config.json").is_file()
    assert set(first.adapters) == set(ADAPTERS)
    assert all((d / "adapter_config.json").is_file() for d in first.adapters.values())


def test_rebuild_trains_afresh(caplog):
    caplog.set_level(logging.INFO, logger="loraserve.demo")
    demo_model(recipe=SMALL)
    rebuilt = demo_model(rebuild=True, recipe=SMALL)
    assert builds(caplog) == 2
    assert (rebuilt.base / "config.json").is_file()
    assert [p.name for p in demo_dir(SMALL).parent.iterdir() if p.is_dir()] == [
        demo_dir(SMALL).name
    ], "nothing of the old build is left"


def test_a_build_killed_halfway_is_not_served_and_its_leftovers_go(caplog):
    caplog.set_level(logging.INFO, logger="loraserve.demo")
    root = demo_dir(SMALL)
    leftover = root.parent / f"{root.name}.killed.partial"
    (leftover / "base").mkdir(parents=True)
    demo_model(recipe=SMALL)
    assert builds(caplog) == 1
    assert not leftover.exists()


def test_a_different_recipe_lives_in_its_own_folder():
    other = SMALL.__class__(**{**SMALL.__dict__, "seed": 1})
    assert demo_dir(other) != demo_dir(SMALL)


def test_processes_starting_together_train_it_once(caplog):
    caplog.set_level(logging.INFO, logger="loraserve.demo")
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo_model(recipe=SMALL)))
               for _ in range(3)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds(caplog) == 1
    assert len(results) == 3 and len(set(map(str, results))) == 1
