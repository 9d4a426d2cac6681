"""Keeping one process's view of a shared adapter store current.

`StoreWatcher` calls `AdapterStore.refresh` every `interval_s` on a daemon thread, for as long
as `running()` says (the engine's life) or until `stop`: while no process changes the store
that is one read of a small file; after a change it re-reads the store's layout, so `latest`
moves, listings and quotas follow other processes' publishes and deletes within one interval.
Versions found deleted go to `forget`, which drops their weights from the host and device tiers
(requests in flight keep the slot they hold). A refresh that fails (the volume went away for a
moment) is logged and tried again next interval.

Knows nothing about requests or tiers beyond the `forget` it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from loraserve.adapters.keys import AdapterKey
from loraserve.adapters.store import AdapterStore

log = logging.getLogger(__name__)


class StoreWatcher:
    def __init__(
        self,
        store: AdapterStore,
        forget: Callable[[AdapterKey], None],
        interval_s: float,
        running: Callable[[], bool] = lambda: True,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"the store refresh interval must be > 0, got {interval_s}")
        self._store = store
        self._forget = forget
        self._interval_s = interval_s
        self._running = running
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s) and self._running():
            try:
                removed = self._store.refresh()
            except OSError as error:
                log.warning("adapter store refresh failed (retrying): %s", error)
                continue
            for key in removed:
                log.info("adapter %s was deleted by another process; dropping its weights", key)
                self._forget(key)
