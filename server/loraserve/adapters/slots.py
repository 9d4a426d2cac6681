"""Device slots: which adapter lives in which LoRA slot, and who is using it.

Invariant: a slot's weights change only while no in-flight sequence holds a reference on it.
`acquire` takes a reference for a sequence; `release` drops it. `unload` of an adapter in use
takes effect when its last reference is released: running sequences finish on the weights they
started with, and no new sequence can acquire it in the meantime. Slot 0 is the base model
(all zeros) and is never assigned.

Knows nothing about requests or scheduling; validation is `peft_format`'s job.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from loraserve.adapters.peft_format import LoraWeights, read_peft_adapter
from loraserve.model.lora import MultiLoraLinear
from loraserve.types import AdapterNotFoundError, CapacityError, InvalidRequestError

BASE_SLOT = 0


class AdapterSlots:
    """Name -> slot table over the wrapped layers' slot buffers, with reference counts."""

    def __init__(
        self, layers: dict[str, MultiLoraLinear], num_slots: int, max_rank: int, dtype: torch.dtype
    ) -> None:
        self.layers = layers
        self.max_rank = max_rank
        self.dtype = dtype
        self.targets = {name: (m.in_features, m.out_features) for name, m in layers.items()}
        self.slot_ranks = [0] * (num_slots + 1)  # read by the runner; index = slot
        self._slot_of: dict[str, int] = {}
        self._refs = [0] * (num_slots + 1)
        self._retiring: set[int] = set()
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return len(self._refs) - 1

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._slot_of)

    def load(self, name: str, directory: str | Path) -> int:
        """Validate the PEFT directory and place it in a free slot; returns the slot."""
        if not name:
            raise InvalidRequestError("adapter name must be non-empty")
        weights = read_peft_adapter(directory, self.targets, self.max_rank, self.dtype)
        with self._lock:
            if name in self._slot_of:
                raise InvalidRequestError(f"adapter {name!r} is already loaded; unload it first")
            slot = self._free_slot()
            self._write(slot, weights)
            self._slot_of[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Forget `name`; its slot is cleared now, or when its last in-flight user releases it."""
        with self._lock:
            slot = self._slot_of.pop(name, None)
            if slot is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            if self._refs[slot]:
                self._retiring.add(slot)
            else:
                self._clear(slot)

    def acquire(self, name: str | None) -> int:
        """A reference on the slot of `name` (None or "" -> the base model, slot 0)."""
        if not name:
            return BASE_SLOT
        with self._lock:
            slot = self._slot_of.get(name)
            if slot is None:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded; load it first, or omit it for the base model"
                )
            self._refs[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        with self._lock:
            self._refs[slot] -= 1
            if self._refs[slot] == 0 and slot in self._retiring:
                self._retiring.discard(slot)
                self._clear(slot)

    def references(self, slot: int) -> int:
        return self._refs[slot]

    def _free_slot(self) -> int:
        used = set(self._slot_of.values()) | self._retiring
        for slot in range(1, len(self._refs)):
            if slot not in used:
                return slot
        raise CapacityError(
            f"all {self.num_slots} adapter slots are in use; unload an adapter or start the "
            "server with more --device-slots"
        )

    def _write(self, slot: int, weights: LoraWeights) -> None:
        for name, layer in self.layers.items():
            if name in weights.modules:
                a, b = weights.modules[name]
                layer.set_slot(slot, a, b)
            else:
                layer.clear_slot(slot)
        self.slot_ranks[slot] = weights.rank

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_ranks[slot] = 0
