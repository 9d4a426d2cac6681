"""KV block accounting: the free list, reference counts, and the prefix cache.

A sequence holds a block table (a list of block ids); block 0 is the cache's scratch block and
is never handed out. Blocks are reference counted: a block whose every position holds computed
KV (of prompt or generated tokens) can be published under the hash of its whole prefix, and a
later sequence whose prompt starts with the same tokens in the same namespace shares it instead
of recomputing it. A shared
block is only read: a sequence writes past its shared prefix, into blocks of its own.

Hashes chain: block i's hash covers the namespace and every token of blocks 0..i, so equal
hashes mean equal prefixes (blake2b, 128 bits: collisions are not a concern). The namespace is
whatever the caller says must never share (the engine uses the tenant and the adapter key).

Unreferenced published blocks stay cached and count as free: `allocate` hands out never-cached
blocks first, then evicts cached ones least recently used first.

Knows nothing about sequences, adapters or the pools' contents: block ids, tokens and hashes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

SCRATCH_BLOCK = 0


@dataclass(frozen=True)
class Reservation:
    """A block table whose first `cached_tokens` positions already hold the right KV."""

    blocks: list[int]
    cached_tokens: int


@dataclass
class PrefixCounters:
    queried_blocks: int = 0  # full prompt blocks looked up
    hit_blocks: int = 0  # of which were found cached


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is scratch)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.counters = PrefixCounters()
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # never cached, or evicted
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}  # published hash -> block
        self._hash_of: dict[int, bytes] = {}  # published block -> hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Published blocks, in use or not."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks, one reference each; MemoryError (taking none) if not free."""
        if count > self.free_blocks:
            raise MemoryError(f"asked for {count} KV blocks, {self.free_blocks} free")
        taken: list[int] = []
        while len(taken) < count:
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            taken.append(block)
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; a published block stays cached when unreferenced."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"KV block {block} freed more often than taken")
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- the prefix cache -------------------------------------------------------------------

    def prefix_hashes(
        self, namespace: Hashable, tokens: Sequence[int], known: Sequence[bytes] = ()
    ) -> list[bytes]:
        """The chained hash of every full block of `tokens` under `namespace`; `known`, the
        hashes of its first blocks already computed, are kept and the chain goes on from them."""
        hashes = list(known)
        if hashes:
            parent = hashes[-1]
        else:
            parent = hashlib.blake2b(repr(namespace).encode(), digest_size=16).digest()
        start = (len(hashes) + 1) * self.block_size
        for end in range(start, len(tokens) + 1, self.block_size):
            block = array("q", tokens[end - self.block_size : end]).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            hashes.append(parent)
        return hashes

    def reserve(self, hashes: Sequence[bytes], total_blocks: int) -> Reservation | None:
        """`total_blocks` blocks whose leading ones are the cached blocks matching `hashes` (as
        many as are cached, in order), the rest fresh; None, changing nothing, when the fresh
        ones are not free."""
        shared: list[int] = []
        for digest in hashes[:total_blocks]:
            block = self._block_of.get(digest)
            if block is None:
                break
            shared.append(block)
        reviving = sum(1 for b in shared if self._refs[b] == 0)  # leave the free count
        if total_blocks - len(shared) > self.free_blocks - reviving:
            return None
        self.counters.queried_blocks += len(hashes)
        self.counters.hit_blocks += len(shared)
        for block in shared:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        fresh = self.allocate(total_blocks - len(shared))
        return Reservation(shared + fresh, len(shared) * self.block_size)

    def publish(self, hashes: Sequence[bytes], blocks: Sequence[int], computed_tokens: int) -> None:
        """Publish blocks[i] under hashes[i] for every full block within `computed_tokens`
        (a block already published, or a prefix published by another block, is left as is)."""
        for i in range(min(len(hashes), computed_tokens // self.block_size)):
            block, digest = blocks[i], hashes[i]
            if block not in self._hash_of and digest not in self._block_of:
                self._hash_of[block] = digest
                self._block_of[digest] = block
