"""The host-RAM tier: validated adapter weights, ready to copy into a device slot.

An LRU bounded in bytes (not entries): inserting past the budget evicts the least recently
used entries first; an entry larger than the whole budget is not kept at all. On CUDA the
tensors are pinned so the copy into a slot can run asynchronously.

Knows nothing about disk layout, slots or requests: keys are opaque and values are LoraWeights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace

from loraserve.adapters.peft_format import LoraWeights


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class HostCache:
    def __init__(self, budget_bytes: int, pin_memory: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory
        self.counters = TierCounters()
        self._entries: OrderedDict[Hashable, LoraWeights] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> LoraWeights | None:
        with self._lock:
            weights = self._entries.get(key)
            if weights is None:
                self.counters.misses += 1
                return None
            self._entries.move_to_end(key)
            self.counters.hits += 1
            return weights

    def put(self, key: Hashable, weights: LoraWeights) -> LoraWeights:
        """Keep `weights` (pinned on CUDA hosts) within the budget; returns what is stored."""
        if self.pin_memory:
            pinned = {name: module.pinned() for name, module in weights.modules.items()}
            weights = replace(weights, modules=pinned)
        size = weights.nbytes
        with self._lock:
            self._drop(key)
            if size > self.budget_bytes:
                return weights
            while self._bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.counters.evictions += 1
            self._entries[key] = weights
            self._bytes += size
        return weights

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        weights = self._entries.pop(key, None)
        if weights is not None:
            self._bytes -= weights.nbytes
