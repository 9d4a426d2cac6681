"""The adapter lifecycle across tiers: disk (store or local directory) -> host RAM -> device slot.

`AdapterManager` resolves names to immutable keys, hands the scheduler references on device
slots, and loads weights off the decode loop on one background thread: single-flight per slot,
disk -> host (validated, scaling folded, pinned on CUDA) -> slot buffers (a side stream on CUDA).
A failed load fails only the requests waiting for that adapter and is remembered for
`failure_ttl_s`, so a broken adapter is not retried in a loop.

Keys: a start-up or Python-registered adapter is ("local", name, generation); a stored one is
("store", AdapterRef, weights sha256). Replacing or deleting an adapter makes a new key or
forgets the old one, so a new request can never reach stale weights.

Knows nothing about requests or scheduling policy; the scheduler decides who waits.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.adapters.device_slots import SlotState, SlotTable
from loraserve.adapters.host_cache import HostCache, TierCounters
from loraserve.adapters.peft_format import WEIGHTS_FILE, LoraWeights, read_peft_adapter
from loraserve.metrics import Metrics
from loraserve.model.lora import MultiLoraLinear
from loraserve.types import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    shown,
)

log = logging.getLogger(__name__)

BASE_SLOT = 0
AdapterKey = Hashable


def manifest_key(manifest) -> AdapterKey:
    """The key of a stored version: its ref and the weights' sha256, so a version number
    reused after a delete can never alias the old weights."""
    return ("store", manifest.ref, manifest.files[WEIGHTS_FILE]["sha256"])


def _failure_reason(error: Exception) -> str:
    """A bounded label for a failed load."""
    for cls, reason in (
        (InvalidAdapterError, "invalid"),
        (AdapterIncompatibleError, "incompatible"),
        (AdapterNotFoundError, "not_found"),
        (OSError, "io"),
    ):
        if isinstance(error, cls):
            return reason
    return "other"


@dataclass
class LoadStats:
    """Device-tier counters and the durations of recent loads (seconds, host RAM to slot)."""

    counters: TierCounters
    load_seconds: deque
    failures: int = 0


class AdapterManager:
    def __init__(
        self,
        layers: dict[str, MultiLoraLinear],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        host_budget_bytes: int,
        failure_ttl_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.layers = layers
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.targets = {name: (m.in_features, m.out_features) for name, m in layers.items()}
        self.slot_ranks = [0] * (num_slots + 1)  # read by the runner; index = slot
        self._slot_bytes = sum(m.lora_a[0].nbytes + m.lora_b[0].nbytes for m in layers.values())
        self.table = SlotTable(num_slots)
        self.host = HostCache(host_budget_bytes, pin_memory=device.type == "cuda")
        self.device_stats = LoadStats(TierCounters(), deque(maxlen=1024))
        self.failure_ttl_s = failure_ttl_s
        self.store = None  # an AdapterStore, attached by the server when it has one
        self._local: dict[str, AdapterKey] = {}  # name -> key of its current registration
        self._local_paths: dict[AdapterKey, Path] = {}  # kept for in-flight users of old keys
        self._generation = itertools.count(1)
        self._failures: dict[AdapterKey, tuple[Exception, float]] = {}  # key -> (error, when)
        self._host_pending: set[AdapterKey] = set()
        self._lock = threading.RLock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_jobs = 0
        self._jobs_done = threading.Condition(self._lock)
        self.on_load_done: Callable[[], None] | None = None  # wakes the engine loop
        self._loader = threading.Thread(
            target=self._load_loop, name="loraserve-loader", daemon=True
        )
        self._loader.start()

    @property
    def num_slots(self) -> int:
        return len(self.table.slots)

    @property
    def device_bytes(self) -> int:
        """Bytes of the slots holding an adapter (each slot's buffers are preallocated)."""
        used = sum(s.key is not None for s in self.table.slots)
        return used * self._slot_bytes

    # ---- names -> keys ------------------------------------------------------------------

    def load(self, name: str, directory: str | Path) -> AdapterKey:
        """Validate a PEFT directory now and register it under `name`, shared by all tenants.

        Raises the validation error at once. A later `load` of the same name replaces it: new
        requests get the new weights, in-flight ones finish on the old.
        """
        if not name:
            raise InvalidRequestError("adapter name must be non-empty")
        weights = read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
        key = ("local", name, next(self._generation))
        with self._lock:
            previous = self._local.get(name)
            self._local[name] = key
            self._local_paths[key] = Path(directory)
            if previous is not None:
                self.forget(previous)
        self.host.put(key, weights)
        return key

    def unload(self, name: str) -> None:
        with self._lock:
            key = self._local.pop(name, None)
            if key is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            self.forget(key)

    def resolve(self, name: str | None, tenant: str | None = None, version: str | None = None):
        """The key of `name` for `tenant` (its own adapters first, then shared); None = base."""
        if not name:
            return None
        if self.store is not None and tenant is not None:
            ref = self.store.find(tenant, name, version)
            if ref is not None:
                return self.store_key(ref)
        with self._lock:
            key = self._local.get(name)
        if key is None or version:
            raise AdapterNotFoundError(
                f"adapter {shown(name)}{f' version {shown(version)}' if version else ''} not "
                "found; upload it first, or omit the adapter to use the base model"
            )
        return key

    def store_key(self, ref) -> AdapterKey:
        """The key of a stored version (see `manifest_key`)."""
        return manifest_key(self.store.manifest(ref))

    def forget(self, key: AdapterKey) -> None:
        """`key` was deleted or replaced: never hand it out again; free its tiers when idle."""
        with self._lock:
            self.host.discard(key)
            self._failures.pop(key, None)
            slot = self.table.forget(key)
            if slot is not None:
                self.slot_ranks[slot.index] = 0

    # ---- slots for the scheduler ----------------------------------------------------------

    def raise_if_failed(self, key: AdapterKey | None) -> None:
        """Raise the remembered error of a recent failed load of `key`, if any."""
        with self._lock:
            failure = self._failures.get(key)
            if failure is None:
                return
            if time.monotonic() < failure[1] + self.failure_ttl_s:
                raise failure[0]
            del self._failures[key]

    def reserve(self, key: AdapterKey | None) -> int | None:
        """A reference on the slot for `key` (loading in the background if cold), or None when
        no slot can be given right now. Raises the remembered error of a recent failed load."""
        if key is None:
            return BASE_SLOT
        with self._lock:
            self.raise_if_failed(key)
            slot, needs_load = self.table.reserve(key)
            if slot is None:
                return None
            counters = self.device_stats.counters
            if needs_load:
                counters.misses += 1
                self.slot_ranks[slot.index] = 0
                self._submit(slot.index, key)
            else:
                counters.hits += 1
            return slot.index

    def is_ready(self, slot: int) -> bool:
        return slot == BASE_SLOT or self.table.slot(slot).state is SlotState.READY

    def load_error(self, slot: int) -> Exception | None:
        return None if slot == BASE_SLOT else self.table.slot(slot).error

    def release(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        with self._lock:
            if self.table.release(self.table.slot(slot)):
                self.slot_ranks[slot] = 0

    def make_room(self) -> None:
        """A request has waited too long for a slot: drain the least-demanded one for it."""
        with self._lock:
            self.table.drain_one()

    def references(self, slot: int) -> int:
        return self.table.slot(slot).refs

    # ---- operator controls ---------------------------------------------------------------

    def prefetch(self, key: AdapterKey) -> bool:
        """Start loading `key` into a slot without a request; False when no slot is free."""
        slot = self.reserve(key)
        if slot is None:
            return False
        self.release(slot)
        return True

    def warm_host(self, key: AdapterKey) -> None:
        """Read `key` into the host tier in the background (look-ahead for the queue)."""
        with self._lock:
            if key is None or key in self.host or key in self._host_pending:
                return
            self._host_pending.add(key)
            self._submit(None, key)

    def pin(self, key: AdapterKey, pinned: bool) -> bool:
        """Keep `key` in a device slot (loading it if needed), or let it go; returns the pin.

        False when pinning finds no slot free of in-flight users and other pins.
        """
        with self._lock:
            if not pinned:
                slot = self.table.find(key)
                if slot is not None:
                    slot.pinned = False
                return False
            index = self.reserve(key)
            if index is None:
                return False
            self.table.slot(index).pinned = True
            self.release(index)
            return True

    def residency(self, key: AdapterKey) -> str:
        with self._lock:
            slot = self.table.find(key)
            if slot is not None and slot.state is SlotState.READY:
                return "device"
        return "host" if key in self.host else "disk"

    # ---- the loader thread ----------------------------------------------------------------

    def wait_for_loads(self, timeout: float) -> bool:
        """Block until every queued load has finished; False on timeout."""
        with self._jobs_done:
            return self._jobs_done.wait_for(lambda: self._pending_jobs == 0, timeout)

    def _submit(self, index: int | None, key: AdapterKey) -> None:
        with self._lock:
            self._pending_jobs += 1
        self._jobs.put((index, key))

    def _job_done(self) -> None:
        with self._jobs_done:
            self._pending_jobs -= 1
            self._jobs_done.notify_all()
        if self.on_load_done is not None:
            self.on_load_done()

    def _directory(self, key: AdapterKey) -> Path:
        with self._lock:
            directory = self._local_paths.get(key)
        if directory is not None:
            return directory
        if self.store is None:
            raise AdapterNotFoundError(f"adapter {key} has no store")
        return self.store.path(key[1])

    def _host_weights(self, key: AdapterKey) -> LoraWeights:
        weights = self.host.get(key)
        if weights is None:
            started = time.perf_counter()
            directory = self._directory(key)
            weights = read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
            weights = self.host.put(key, weights)
            elapsed = time.perf_counter() - started
            self.metrics.adapter_load_seconds.labels("host").observe(elapsed)
        return weights

    def _load_loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            index, key = self._jobs.get()
            try:
                self._run_job(index, key, stream)
            finally:
                self._job_done()

    def _run_job(self, index: int | None, key: AdapterKey, stream) -> None:
        """Bring `key` to the host tier, then (when `index` is given) into that slot."""
        try:
            weights = self._host_weights(key)
        except Exception as error:
            self._fail(index, key, error)
            return
        started = time.perf_counter()
        with self._lock:
            self._host_pending.discard(key)
            if index is None:
                return
            slot = self.table.slot(index)
            if slot.key != key or slot.state is not SlotState.LOADING:
                return  # evicted or forgotten before its turn
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                self._write(index, weights)
            if stream is not None:
                stream.synchronize()
        except Exception as error:
            self._fail(index, key, error)
            return
        with self._lock:
            if slot.key == key and slot.state is SlotState.LOADING:
                self.slot_ranks[index] = weights.rank
                slot.state = SlotState.READY
        elapsed = time.perf_counter() - started
        self.device_stats.load_seconds.append(elapsed)
        self.metrics.adapter_load_seconds.labels("device").observe(elapsed)

    def _fail(self, index: int | None, key: AdapterKey, error: Exception) -> None:
        log.warning("loading adapter %s failed: %s", key, error)
        self.metrics.adapter_load_failures.labels(_failure_reason(error)).inc()
        with self._lock:
            self.device_stats.failures += 1
            self._failures[key] = (error, time.monotonic())
            self._host_pending.discard(key)
            if index is not None:
                slot = self.table.slot(index)
                if slot.key == key:
                    slot.state, slot.error = SlotState.FAILED, error

    def _write(self, index: int, weights: LoraWeights) -> None:
        for name, layer in self.layers.items():
            if name in weights.modules:
                a, b = weights.modules[name]
                layer.set_slot(index, a, b)
            else:
                layer.clear_slot(index)
