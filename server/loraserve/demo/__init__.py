"""The built-in demo: a small base model and LoRA adapters that visibly differ, trained offline.

`loraserve serve` without `--model` serves it: `demo_model` returns the trained directories,
training them into the user's cache the first time (minutes on a small CPU), or again
when asked to rebuild. The folder's name carries a digest of the recipe and the language, so a
changed recipe trains afresh instead of serving stale weights. Concurrent processes build it
once (a file lock), and a build killed halfway leaves nothing that looks finished.

Knows nothing about serving: the caller loads the base and shares the adapters like any others.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from loraserve.demo.language import ADAPTERS, VOCABULARY
from loraserve.demo.training import Recipe, train_demo

log = logging.getLogger(__name__)

DEMO_FORMAT = 2  # bump when the training code changes what a recipe writes
REPORT = "demo.json"


@dataclass(frozen=True)
class DemoModel:
    base: Path  # an HF model directory
    adapters: dict[str, Path]  # PEFT adapter directories by name


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraserve"


def demo_dir(recipe: Recipe) -> Path:
    """Where this recipe's demo lives in the cache."""
    fingerprint = json.dumps([DEMO_FORMAT, asdict(recipe), VOCABULARY], sort_keys=True)
    return cache_root() / f"demo-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"


def _located(root: Path) -> DemoModel:
    return DemoModel(root / "base", {name: root / "adapters" / name for name in ADAPTERS})


def demo_model(rebuild: bool = False, recipe: Recipe | None = None) -> DemoModel:
    """The demo's directories, trained first when missing (or when `rebuild`)."""
    recipe = recipe or Recipe()
    root = demo_dir(recipe)
    if not rebuild and (root / REPORT).is_file():
        return _located(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not rebuild and (root / REPORT).is_file():  # another process built it meanwhile
            return _located(root)
        for leftover in root.parent.glob(root.name + ".*.partial"):  # from a killed build
            shutil.rmtree(leftover, ignore_errors=True)
        log.info("training the demo model and adapters (once, minutes on a CPU) into %s", root)
        staging = Path(tempfile.mkdtemp(prefix=root.name + ".", suffix=".partial", dir=root.parent))
        train_demo(staging, recipe, home=root)
        if root.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=root.name + ".", suffix=".partial", dir=root.parent)
            )
            root.rename(retired / "old")
            shutil.rmtree(retired)
        staging.rename(root)
    return _located(root)
