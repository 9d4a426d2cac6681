"""The adapter lifecycle across tiers: disk (store or local directory) -> host RAM -> device slot.

`AdapterManager` is the one door to adapters for the engine and the API:
- names: `load` / `unload` register PEFT directories under a name, and `resolve` turns the
  adapter a request names into an immutable `AdapterKey` (see `registry`);
- admission: `acquire(key)` answers READY (its slot holds the weights), WAITING (loading, or no
  slot free yet: ask again next step) or FAILED (the load failed), and `release` gives the slot
  reference back;
- operators: `prefetch`, `pin`, `forget` (deleted or replaced), `status`, `keep_in_host`,
  `prepare` (an upload's weights checked against the base before it is published);
- `stats()`: one snapshot for the metrics.
Loads run on the `loader` thread, single-flight per slot: disk -> host (validated, scaling
folded, DoRA and bias terms computed against the base by `prepare`, pinned on CUDA) -> slot
buffers. A failed load fails only the requests waiting for that adapter and is remembered for
`failure_ttl_s`, so a broken adapter is not retried in a loop.
Every method takes the manager's lock briefly and none waits on I/O, except `wait_for_loads`.

Knows nothing about requests or scheduling policy; the scheduler decides who waits.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraserve.adapters.device_slots import SlotState, SlotTable
from loraserve.adapters.host_cache import HostCache
from loraserve.adapters.keys import AdapterKey, local_key
from loraserve.adapters.loader import Loader, write_slot
from loraserve.adapters.manifest import check_identifier
from loraserve.adapters.peft_format import LoraWeights, read_peft_adapter
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.store import AdapterStore
from loraserve.metrics import AdapterStats, Metrics, TierStats
from loraserve.model.lora import LoraLayer
from loraserve.types import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    CapacityError,
    InvalidAdapterError,
)

log = logging.getLogger(__name__)

BASE_SLOT = 0


class Admission(enum.Enum):
    READY = "ready"  # the slot holds the adapter's weights: run
    WAITING = "waiting"  # loading, or no slot free yet: ask again next step
    FAILED = "failed"  # the adapter could not be loaded: fail the request with `error`


@dataclass(frozen=True)
class Grant:
    """What `acquire` answers. slot: the slot the caller holds a reference on from now until it
    calls `release` once (None: it holds none); error: why the adapter FAILED."""

    admission: Admission
    slot: int | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class AdapterStatus:
    residency: str  # "device", "host" or "disk": the fastest tier holding it
    pinned: bool


@dataclass(frozen=True)
class _Failure:
    error: Exception
    at: float  # time.monotonic()


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


class AdapterManager:
    """layers: the model's LoRA layers by module path, each with `num_slots + 1` slots.
    store: where tenants' uploaded adapters live (None: only `load`ed ones are served).
    on_load_done: called on the loader thread after every load, to wake the engine loop."""

    def __init__(
        self,
        layers: dict[str, LoraLayer],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        host_budget_bytes: int,
        *,
        store: AdapterStore | None = None,
        on_load_done: Callable[[], None] | None = None,
        failure_ttl_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.max_rank = max_rank
        self.dtype = dtype
        self.failure_ttl_s = failure_ttl_s
        self.targets = {name: (m.in_features, m.out_features) for name, m in layers.items()}
        self._layers = layers
        self._slot_ranks = [0] * (num_slots + 1)
        self._slot_bytes = sum(layer.slot_nbytes for layer in layers.values())
        self._registry = AdapterRegistry(store)
        self._table = SlotTable(num_slots)
        self._host = HostCache(host_budget_bytes, pin_memory=device.type == "cuda")
        self._device_hits = self._device_misses = self._load_failures = 0
        self._failures: dict[AdapterKey, _Failure] = {}
        self._host_pending: set[AdapterKey] = set()
        self._lock = threading.RLock()
        self._loader = Loader(device, on_load_done)

    @property
    def slot_ranks(self) -> list[int]:
        """slot -> rank of the adapter it holds (0: none). The model runner reads this list
        each step to slice LoRA buffers to the batch's rank; it is updated in place."""
        return self._slot_ranks

    # ---- names -> keys ------------------------------------------------------------------

    def load(
        self, name: str, directory: str | Path, weights: LoraWeights | None = None
    ) -> AdapterKey:
        """Validate a PEFT directory now and register it under `name`, shared by all tenants.

        Raises the validation error at once (`weights`: already validated from `directory` for
        these targets, max rank and dtype). A later `load` of the same name replaces it: new
        requests get the new weights, in-flight ones finish on the old.
        """
        check_identifier("adapter name", name)
        directory = Path(directory)
        if weights is None:
            weights = read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
        weights = self.prepare(weights, f"adapter at {directory.name!r}")
        key = local_key(name, directory)
        with self._lock:
            replaced = self._registry.register(key, directory)
            self._failures.pop(key, None)  # the same files again: an operator's retry
            if replaced is not None and replaced != key:
                self.forget(replaced)
        self._host.put(key, weights)
        return key

    def unload(self, name: str) -> None:
        with self._lock:
            self.forget(self._registry.unregister(name))

    def resolve(
        self, name: str | None, tenant: str | None = None, version: str | None = None
    ) -> AdapterKey | None:
        """The key of `name` for `tenant` (its own adapters first, then shared); None = base.
        Answers from memory and one `lstat` (is the stored version still there?): safe on an
        event loop."""
        return self._registry.resolve(name, tenant, version)

    def forget(self, key: AdapterKey) -> None:
        """`key` was deleted or replaced: never hand it out again; free its tiers when idle."""
        with self._lock:
            self._host.discard(key)
            self._failures.pop(key, None)
            slot = self._table.forget(key)
            if slot is not None:
                self._slot_ranks[slot.index] = 0

    def keep_in_host(self, key: AdapterKey, weights: LoraWeights) -> None:
        """Weights validated elsewhere (a publish) for these targets, max rank and dtype: keep
        them in the host tier, so the first request for `key` reads nothing from disk."""
        if weights.dtype != self.dtype:
            raise ValueError(f"adapter {key} was validated in another dtype than {self.dtype}")
        self._host.put(key, self.prepare(weights, f"adapter {key}"))

    def prepare(self, weights: LoraWeights, label: str = "adapter") -> LoraWeights:
        """`weights` with what needs the base model's own weights computed against them (DoRA's
        rescale, trained biases; see `model/slot_terms.py`): the form the host tier keeps and
        slots copy. Raises AdapterIncompatibleError naming every module that cannot be served
        on this base; `label` names the adapter in it."""
        modules, problems = {}, []
        for name, module in weights.modules.items():
            layer = self._layers.get(name)
            try:
                if layer is None:
                    raise ValueError("the engine holds no LoRA layer there")
                modules[name] = layer.resolve(module)
            except ValueError as error:
                problems.append(f"{name}: {error}")
        if problems:
            raise AdapterIncompatibleError(f"{label} does not fit this base model:", problems)
        return replace(weights, modules=modules)

    # ---- admission ----------------------------------------------------------------------

    def acquire(self, key: AdapterKey | None, held: int | None = None) -> Grant:
        """Ask for a device slot holding `key` (None: the base model, always READY).

        held: the slot of this caller's earlier WAITING grant; its reference carries over, so
        a caller asks again each step with what it holds. A cold adapter is loaded in the
        background. FAILED releases whatever the caller held.
        """
        if key is None:
            return Grant(Admission.READY, BASE_SLOT)
        with self._lock:
            if held is None:
                error = self._recent_failure(key)
                if error is not None:
                    return Grant(Admission.FAILED, error=error)
                slot, needs_load = self._table.reserve(key)
                if slot is None:
                    return Grant(Admission.WAITING)
                if needs_load:
                    self._device_misses += 1
                    self._slot_ranks[slot.index] = 0
                    self._submit(key, slot.index)
                else:
                    self._device_hits += 1
                held = slot.index
            slot = self._table.slot(held)
            if slot.state is SlotState.FAILED:
                error = slot.error
                self.release(held)
                return Grant(Admission.FAILED, error=error)
            ready = slot.state is SlotState.READY
            return Grant(Admission.READY if ready else Admission.WAITING, held)

    def release(self, slot: int) -> None:
        """Give back the reference of one READY or WAITING grant."""
        if slot == BASE_SLOT:
            return
        with self._lock:
            if self._table.release(self._table.slot(slot)):
                self._slot_ranks[slot] = 0

    def make_room(self) -> None:
        """A request has waited too long for a slot: drain the least-demanded one for it."""
        with self._lock:
            self._table.drain_one()

    def warm_host(self, key: AdapterKey | None) -> None:
        """Read `key` into the host tier in the background (look-ahead for the queue)."""
        with self._lock:
            if key is None or key in self._host or key in self._host_pending:
                return
            self._host_pending.add(key)
            self._submit(key, None)

    # ---- operator controls ---------------------------------------------------------------

    def prefetch(self, key: AdapterKey) -> bool:
        """Start loading `key` into a slot without a request; False when no slot is free.
        Raises the error of a recent failed load."""
        grant = self.acquire(key)
        if grant.error is not None:
            raise grant.error
        if grant.slot is None:
            return False
        self.release(grant.slot)
        return True

    def pin(self, key: AdapterKey, pinned: bool) -> bool:
        """Keep `key` in a device slot (loading it if needed), or let it go; returns the pin.

        Raises CapacityError when no slot is free of in-flight users and other pins, and the
        error of a recent failed load.
        """
        with self._lock:
            if not pinned:
                slot = self._table.find(key)
                if slot is not None:
                    slot.pinned = False
                return False
            grant = self.acquire(key)
            if grant.error is not None:
                raise grant.error
            if grant.slot is None:
                raise CapacityError(
                    "no device slot is free to pin this adapter into; unpin another or retry"
                )
            self._table.slot(grant.slot).pinned = True
            self.release(grant.slot)
            return True

    def status(self, key: AdapterKey) -> AdapterStatus:
        with self._lock:
            slot = self._table.find(key)
            pinned = slot is not None and slot.pinned
            if slot is not None and slot.state is SlotState.READY:
                return AdapterStatus("device", pinned)
            return AdapterStatus("host" if key in self._host else "disk", pinned)

    def stats(self) -> AdapterStats:
        """A consistent snapshot of the tiers, for the metrics and tests."""
        with self._lock:
            slots = self._table.slots
            used = sum(s.key is not None for s in slots)
            host = self._host.counters
            return AdapterStats(
                slots_used=used,
                slots_total=len(slots),
                references=sum(s.refs for s in slots),
                host_entries=len(self._host),
                load_failures=self._load_failures,
                host=TierStats(host.hits, host.misses, host.evictions, self._host.resident_bytes),
                device=TierStats(
                    self._device_hits,
                    self._device_misses,
                    self._table.evictions,
                    used * self._slot_bytes,  # each slot's buffers are preallocated
                ),
            )

    def wait_for_loads(self, timeout: float) -> bool:
        """Block until every queued load has finished; False on timeout."""
        return self._loader.wait_idle(timeout)

    # ---- loading, on the loader thread ----------------------------------------------------

    def _recent_failure(self, key: AdapterKey) -> Exception | None:
        failure = self._failures.get(key)
        if failure is None:
            return None
        if time.monotonic() < failure.at + self.failure_ttl_s:
            return failure.error
        del self._failures[key]
        return None

    def _submit(self, key: AdapterKey, index: int | None) -> None:
        self._loader.submit(lambda stream: self._load(key, index, stream))

    def _host_weights(self, key: AdapterKey) -> LoraWeights:
        weights = self._host.get(key)
        if weights is None:
            started = time.perf_counter()
            directory = self._registry.directory(key)
            weights = read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
            weights = self._host.put(key, self.prepare(weights, f"adapter {key}"))
            elapsed = time.perf_counter() - started
            self.metrics.adapter_load_seconds.labels("host").observe(elapsed)
        return weights

    def _load(self, key: AdapterKey, index: int | None, stream: torch.cuda.Stream | None) -> None:
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
            slot = self._table.slot(index)
            if slot.key != key or slot.state is not SlotState.LOADING:
                return  # evicted or forgotten before its turn
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                write_slot(self._layers, index, weights)
            if stream is not None:
                stream.synchronize()
        except Exception as error:
            self._fail(index, key, error)
            return
        with self._lock:
            if slot.key == key and slot.state is SlotState.LOADING:
                self._slot_ranks[index] = weights.rank
                slot.state = SlotState.READY
        elapsed = time.perf_counter() - started
        self.metrics.adapter_load_seconds.labels("device").observe(elapsed)

    def _fail(self, index: int | None, key: AdapterKey, error: Exception) -> None:
        log.warning("loading adapter %s failed: %s", key, error)
        self.metrics.adapter_load_failures.labels(_failure_reason(error)).inc()
        with self._lock:
            self._load_failures += 1
            self._failures[key] = _Failure(error, time.monotonic())
            self._host_pending.discard(key)
            if index is not None:
                slot = self._table.slot(index)
                if slot.key == key:
                    slot.state, slot.error = SlotState.FAILED, error
