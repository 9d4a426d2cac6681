"""KV block accounting: the free list, reference counts, and the prefix cache.

A sequence holds a block table (a list of block ids); block 0 is the cache's scratch block and
is never handed out. Blocks are reference counted: a block whose every position holds computed
KV (of prompt or generated tokens) can be published under the hash of its whole prefix, and a
later sequence whose prompt starts with the same tokens in the same namespace shares it instead
of recomputing it. A shared block is only read: a sequence writes past its shared prefix, into
blocks of its own.

Hashes chain: a sequence's chain starts with its namespace's digest, and block i's hash covers
the one before it and every token of block i, so equal hashes mean equal prefixes (blake2b, 128
bits: collisions are not a concern). The namespace is whatever the caller says must never share
(the engine uses the tenant and the adapter key).

Past its last shared block a prompt may still find its next tokens cached: a published block
that continues the same prefix and begins with the same tokens (the prompt's own last block,
when its length is a multiple of the block size; a longer prompt's; an answer's; the partly
filled last block of a finished sequence, published for this alone). That block cannot be
shared (the sequence writes the positions after them), so the reservation says to copy its
first positions into a block of the sequence's own: a prompt cached whole computes only its
last token, whatever its length, and a conversation's next turn only its new tokens.

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
from itertools import islice

SCRATCH_BLOCK = 0
CONTINUATIONS_SCANNED = 32  # most recent published blocks compared per prompt at admission


@dataclass(frozen=True)
class BlockCopy:
    """Copy the first `tokens` positions of block `source` into block `target` (in every
    layer's pools); the reservation holds a reference on `source` until the caller frees it."""

    source: int
    target: int
    tokens: int


@dataclass(frozen=True)
class Reservation:
    """A block table whose first `cached_tokens` positions hold the right KV once `copy`, if
    any, is done."""

    blocks: list[int]
    cached_tokens: int
    copy: BlockCopy | None = None


@dataclass
class PrefixCounters:
    queried_blocks: int = 0  # full prompt blocks looked up (those before its last token)
    hit_blocks: int = 0  # of which were found cached
    copied_tokens: int = 0  # prompt tokens past the shared blocks copied from a cached one


@dataclass(frozen=True)
class _Published:
    digest: bytes | None  # the hash of the block's whole prefix; None: a partly filled block
    continues: bytes  # its bucket: the hash before it and its first token
    tokens: tuple[int, ...]  # those its computed positions hold


def _bucket(parent: bytes, first_token: int) -> bytes:
    return parent + first_token.to_bytes(8, "little", signed=True)


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
        self._published: dict[int, _Published] = {}
        self._continuations: dict[bytes, dict[int, None]] = {}  # bucket -> blocks, oldest first
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
        return len(self._published)

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
                self._unpublish(block)
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
                if block in self._published:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- the prefix cache -------------------------------------------------------------------

    def prefix_chain(
        self, namespace: Hashable, tokens: Sequence[int], known: Sequence[bytes] = ()
    ) -> list[bytes]:
        """`namespace`'s digest, then the chained hash of every full block of `tokens`; `known`,
        a chain already computed for their first blocks, is kept and goes on."""
        chain = list(known) or [hashlib.blake2b(repr(namespace).encode(), digest_size=16).digest()]
        start = len(chain) * self.block_size
        for end in range(start, len(tokens) + 1, self.block_size):
            block = array("q", tokens[end - self.block_size : end]).tobytes()
            chain.append(hashlib.blake2b(chain[-1] + block, digest_size=16).digest())
        return chain

    def reserve(
        self, total_blocks: int, chain: Sequence[bytes] = (), prompt: Sequence[int] = ()
    ) -> Reservation | None:
        """`total_blocks` blocks for a sequence whose prompt is `prompt` and its chain `chain`
        (none: nothing cached is used). The leading ones are the cached blocks of the prompt's
        prefix before its last token (which must run to give the first logits), the rest
        fresh; the first fresh one may be filled by copying a cached block that continues that
        prefix with the prompt's next tokens. None, changing nothing, when the fresh ones are
        not free."""
        size = self.block_size
        shareable = max(0, min(total_blocks, (len(prompt) - 1) // size, len(chain) - 1))
        shared: list[int] = []
        for digest in chain[1 : 1 + shareable]:
            block = self._block_of.get(digest)
            if block is None:
                break
            shared.append(block)
        fresh = total_blocks - len(shared)
        reviving = sum(1 for b in shared if self._refs[b] == 0)  # leave the free count
        if fresh > self.free_blocks - reviving:
            return None
        start = len(shared) * size
        source, copied = None, 0
        if chain and fresh:
            wanted = prompt[start : min(start + size, len(prompt) - 1)]
            source, copied = self._continuation(chain[len(shared)], wanted)
        taking_last_free = fresh > self.free_blocks - reviving - 1
        if source is not None and self._refs[source] == 0 and taking_last_free:
            source, copied = None, 0  # holding the source would leave too few free
        self.counters.queried_blocks += shareable
        self.counters.hit_blocks += len(shared)
        self.counters.copied_tokens += copied
        for block in shared + ([source] if source is not None else []):
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        blocks = shared + self.allocate(fresh)
        copy = None if source is None else BlockCopy(source, blocks[len(shared)], copied)
        return Reservation(blocks, start + copied, copy)

    def publish(
        self,
        chain: Sequence[bytes],
        blocks: Sequence[int],
        tokens: Sequence[int],
        computed_tokens: int,
    ) -> None:
        """Publish blocks[i] under chain[i + 1] for every full block of `tokens` within
        `computed_tokens` (a block already published, or a prefix published by another block,
        is left as is)."""
        size = self.block_size
        for i in range(min(len(chain) - 1, computed_tokens // size)):
            block, digest = blocks[i], chain[i + 1]
            if block in self._published or digest in self._block_of:
                continue
            own = tuple(tokens[i * size : (i + 1) * size])
            entry = _Published(digest, _bucket(chain[i], own[0]), own)
            self._published[block] = entry
            self._block_of[digest] = block
            self._continuations.setdefault(entry.continues, {})[block] = None

    def publish_partial(self, parent: bytes, block: int, tokens: Sequence[int]) -> None:
        """Publish `block`, whose first positions hold the KV of `tokens` (fewer than a block's
        worth) after the prefix whose chain ends in `parent`, to be copied from, never shared:
        the last block of a sequence that writes no more."""
        if not tokens or len(tokens) >= self.block_size or block in self._published:
            raise ValueError(f"block {block}: {len(tokens)} tokens are not a partial block")
        entry = _Published(None, _bucket(parent, tokens[0]), tuple(tokens))
        self._published[block] = entry
        self._continuations.setdefault(entry.continues, {})[block] = None

    def _continuation(self, parent: bytes, wanted: Sequence[int]) -> tuple[int | None, int]:
        """Of the blocks published after `parent` (the most recent few), the one whose first
        tokens match most of `wanted`, and how many match; (None, 0) for none."""
        if not wanted:
            return None, 0
        bucket = self._continuations.get(_bucket(parent, wanted[0]), {})
        best, matched = None, 0
        for block in islice(reversed(bucket), CONTINUATIONS_SCANNED):
            same = 0
            for have, want in zip(self._published[block].tokens, wanted):
                if have != want:
                    break
                same += 1
            if same > matched:
                best, matched = block, same
        return best, matched

    def _unpublish(self, block: int) -> None:
        entry = self._published.pop(block)
        if entry.digest is not None:
            del self._block_of[entry.digest]
        bucket = self._continuations[entry.continues]
        del bucket[block]
        if not bucket:
            del self._continuations[entry.continues]
