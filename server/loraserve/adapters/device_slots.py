"""The device tier's slot table: which adapter occupies which LoRA slot, and who holds it.

Invariants, each checked by the tests:
- a slot's weights are written only while its reference count is zero (or by the load that the
  only references are waiting for), so an in-flight sequence never sees its weights change;
- a slot is evicted only when idle (no references) and not pinned, least recently used first;
- a forgotten (deleted or replaced) adapter is never handed to a new reservation; its slot is
  cleared once the last in-flight user releases it.
Slot 0 is the base model (all zeros) and is not in the table.

Pure bookkeeping: no tensors, no threads, no I/O. The manager calls it under its lock.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable
from dataclasses import dataclass


class SlotState(enum.Enum):
    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Slot:
    index: int
    key: Hashable | None = None
    state: SlotState = SlotState.EMPTY
    refs: int = 0
    pinned: bool = False
    draining: bool = False  # no new reservations: another adapter waits for this slot
    forgotten: bool = False  # deleted: clear when the last reference goes
    last_used: int = 0
    error: Exception | None = None


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.slots = [Slot(i) for i in range(1, num_slots + 1)]
        self._by_key: dict[Hashable, Slot] = {}
        self._clock = itertools.count(1)
        self.evictions = 0

    def slot(self, index: int) -> Slot:
        return self.slots[index - 1]

    def find(self, key: Hashable) -> Slot | None:
        return self._by_key.get(key)

    def reserve(self, key: Hashable) -> tuple[Slot | None, bool]:
        """A reference on the slot holding (or about to hold) `key`.

        Returns (slot, needs_load); (None, False) when every slot is busy, pinned or draining.
        A slot returned with needs_load=True is LOADING and must be filled by the caller.
        """
        slot = self._by_key.get(key)
        if slot is not None:
            if slot.draining and slot.refs == 0:
                slot.draining = False  # nobody earlier in line took it: serve its own queue
            if slot.draining or slot.state is SlotState.FAILED:
                return None, False
            slot.refs += 1
            slot.last_used = next(self._clock)
            return slot, False
        victim = self._victim()
        if victim is None:
            return None, False
        if victim.key is not None:
            del self._by_key[victim.key]
            self.evictions += 1
        victim.key, victim.state, victim.refs = key, SlotState.LOADING, 1
        victim.draining = victim.forgotten = False
        victim.error = None
        victim.last_used = next(self._clock)
        self._by_key[key] = victim
        return victim, True

    def release(self, slot: Slot) -> bool:
        """Drop one reference; returns True when the slot must now be cleared (forgotten)."""
        if slot.refs <= 0:
            raise RuntimeError(f"slot {slot.index} released more often than reserved")
        slot.refs -= 1
        if slot.refs == 0 and (slot.forgotten or slot.state is SlotState.FAILED):
            self._empty(slot)
            return True
        return False

    def forget(self, key: Hashable) -> Slot | None:
        """Stop handing out `key`; returns its slot if it must be cleared now."""
        slot = self._by_key.pop(key, None)
        if slot is None:
            return None
        if slot.refs == 0:
            self._empty(slot)
            return slot
        slot.forgotten = True
        return None

    def drain_one(self) -> Slot | None:
        """Stop new reservations on the least-demanded unpinned slot so a waiter can have it."""
        if any(s.draining for s in self.slots):
            return None
        candidates = [s for s in self.slots if s.state is SlotState.READY and not s.pinned]
        if not candidates:
            return None
        slot = min(candidates, key=lambda s: (s.refs, s.last_used))
        slot.draining = True
        return slot

    def _victim(self) -> Slot | None:
        empty = [s for s in self.slots if s.key is None]
        if empty:
            return empty[0]
        idle = [s for s in self.slots if s.refs == 0 and not s.pinned]
        return min(idle, key=lambda s: (not s.draining, s.last_used)) if idle else None

    def _empty(self, slot: Slot) -> None:
        if slot.key is not None and self._by_key.get(slot.key) is slot:
            del self._by_key[slot.key]
        slot.key, slot.state, slot.pinned, slot.draining, slot.forgotten = (
            None,
            SlotState.EMPTY,
            False,
            False,
            False,
        )
        slot.error = None
