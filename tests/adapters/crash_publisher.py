"""Crash-test subprocess: run `scenario` on fresh stores, SIGKILLed at each checkpoint in turn.

Usage: crash_publisher.py ROOT_PREFIX TARGETS_JSON FIRST_DIR SECOND_DIR COUNT

Imports once, then forks one child per kill point k in [0, COUNT): the child runs the scenario
on the store at ROOT_PREFIX-k and kills itself with SIGKILL at its k-th checkpoint. Prints one
JSON list: each child's wait status as returned by os.waitstatus_to_exitcode (-9 when killed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore

TENANT, NAME, FINGERPRINT, MAX_RANK = "acme", "chat", "crash-test", 64


def scenario(publisher: AdapterPublisher, first: Path, second: Path) -> None:
    """Every kind of mutation: publishes that add and move `latest`, deletes that move it back."""
    store = publisher.store
    publisher.publish_dir(TENANT, NAME, first)
    publisher.publish_dir(TENANT, NAME, second)
    store.delete(TENANT, NAME, "2")
    publisher.publish_dir(TENANT, NAME, second, version="exp")
    store.delete(TENANT, NAME, "exp")
    store.delete(TENANT, NAME)


def run_until_killed(root: str, targets: dict, first: Path, second: Path, kill_at: int) -> None:
    reached = 0

    def checkpoint(step: str) -> None:
        nonlocal reached
        if reached == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        reached += 1

    store = AdapterStore(root, checkpoint)
    scenario(AdapterPublisher(store, FINGERPRINT, targets, MAX_RANK), first, second)


def main(root_prefix: str, targets_json: str, first: str, second: str, count: str) -> None:
    targets = {k: tuple(v) for k, v in json.loads(Path(targets_json).read_text()).items()}
    statuses = []
    for kill_at in range(int(count)):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_until_killed(
                    f"{root_prefix}-{kill_at}", targets, Path(first), Path(second), kill_at
                )
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(statuses))


if __name__ == "__main__":
    main(*sys.argv[1:])
