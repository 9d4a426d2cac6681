"""KV block accounting and the prefix cache: references, sharing within a namespace only,
least-recently-used eviction of unreferenced cached blocks, nothing changed by a refusal."""

from __future__ import annotations

import pytest

from loraserve.model.blocks import SCRATCH_BLOCK, BlockAllocator

BLOCK_SIZE = 4
PROMPT = list(range(100, 114))  # 14 tokens: 3 full blocks of 4, then 2


def test_allocator_accounting_through_allocate_and_free():
    alloc = BlockAllocator(num_blocks=6, block_size=BLOCK_SIZE)
    assert (alloc.capacity_tokens, alloc.free_blocks, alloc.used_blocks) == (20, 5, 0)

    first = alloc.allocate(2)
    second = alloc.allocate(3)
    assert len(first) == 2 and len(second) == 3
    assert set(first) | set(second) == {1, 2, 3, 4, 5}, "blocks handed out twice or block 0"
    assert (alloc.free_blocks, alloc.used_blocks) == (0, 5)

    with pytest.raises(MemoryError, match="asked for 1 KV blocks, 0 free"):
        alloc.allocate(1)
    assert (alloc.free_blocks, alloc.used_blocks) == (0, 5)

    alloc.free(first)
    assert (alloc.free_blocks, alloc.used_blocks) == (2, 3)
    assert sorted(alloc.allocate(2)) == sorted(first)
    alloc.free(second)
    assert alloc.allocate(0) == []
    assert (alloc.free_blocks, alloc.used_blocks) == (3, 2)


def test_allocator_refuses_more_than_free_without_taking_any():
    alloc = BlockAllocator(num_blocks=4, block_size=BLOCK_SIZE)
    with pytest.raises(MemoryError, match="asked for 4 KV blocks, 3 free"):
        alloc.allocate(4)
    assert alloc.free_blocks == 3
    assert sorted(alloc.allocate(3)) == [1, 2, 3]


@pytest.mark.parametrize("num_blocks", [2, 3, 17])
def test_allocator_never_hands_out_the_scratch_block(num_blocks):
    alloc = BlockAllocator(num_blocks, BLOCK_SIZE)
    taken = [alloc.allocate(1)[0] for _ in range(num_blocks - 1)]
    assert SCRATCH_BLOCK not in taken
    assert sorted(taken) == list(range(1, num_blocks))
    with pytest.raises(MemoryError):
        alloc.allocate(1)


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_allocator_needs_a_block_besides_scratch(num_blocks):
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockAllocator(num_blocks, BLOCK_SIZE)


@pytest.mark.parametrize(
    ("tokens", "blocks"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (24, 6)]
)
def test_blocks_for_rounds_up(tokens, blocks):
    assert BlockAllocator(8, BLOCK_SIZE).blocks_for(tokens) == blocks


def test_freeing_more_often_than_taken_is_an_error():
    alloc = BlockAllocator(4, BLOCK_SIZE)
    blocks = alloc.allocate(1)
    alloc.free(blocks)
    with pytest.raises(RuntimeError, match="freed more often than taken"):
        alloc.free(blocks)


# ---- the prefix cache ------------------------------------------------------------------------


def _published(alloc: BlockAllocator, namespace, tokens, total_blocks: int):
    """Reserve for `tokens`, compute all of them, publish: as a finished prefill would."""
    hashes = alloc.prefix_hashes(namespace, tokens)
    reservation = alloc.reserve(hashes, total_blocks)
    alloc.publish(hashes, reservation.blocks, len(tokens))
    return hashes, reservation


def test_hashes_chain_over_full_blocks_and_depend_on_namespace_and_every_earlier_token():
    alloc = BlockAllocator(8, BLOCK_SIZE)
    hashes = alloc.prefix_hashes("a", PROMPT)
    assert len(hashes) == len(PROMPT) // BLOCK_SIZE == 3
    assert alloc.prefix_hashes("a", PROMPT[:8]) == hashes[:2]
    assert alloc.prefix_hashes("b", PROMPT)[0] != hashes[0]
    changed = [PROMPT[0] + 1, *PROMPT[1:]]
    assert all(x != y for x, y in zip(alloc.prefix_hashes("a", changed), hashes))


def test_a_chain_goes_on_from_the_hashes_known():
    alloc = BlockAllocator(8, BLOCK_SIZE)
    first = alloc.prefix_hashes("a", PROMPT[:5])
    assert alloc.prefix_hashes("a", PROMPT, known=first) == alloc.prefix_hashes("a", PROMPT)
    assert alloc.prefix_hashes("a", PROMPT[:6], known=first) == first


def test_a_published_prefix_is_shared_and_its_blocks_referenced_by_both():
    alloc = BlockAllocator(16, BLOCK_SIZE)
    hashes, first = _published(alloc, "t/a", PROMPT, 5)
    assert first.cached_tokens == 0
    second = alloc.reserve(hashes, 5)
    assert second.cached_tokens == 3 * BLOCK_SIZE
    assert second.blocks[:3] == first.blocks[:3]
    assert not set(second.blocks[3:]) & set(first.blocks), "private blocks shared"
    assert alloc.counters.hit_blocks == 3 and alloc.counters.queried_blocks == 6
    alloc.free(first.blocks)
    assert alloc.used_blocks == 5, "shared blocks freed while the second sequence holds them"
    alloc.free(second.blocks)
    assert alloc.used_blocks == 0 and alloc.free_blocks == 15
    assert alloc.cached_blocks == 3, "unreferenced published blocks stay cached"


def test_only_computed_full_blocks_are_published():
    alloc = BlockAllocator(16, BLOCK_SIZE)
    hashes = alloc.prefix_hashes("ns", PROMPT)
    reservation = alloc.reserve(hashes, 5)
    alloc.publish(hashes, reservation.blocks, 7)  # a prefill chunk ending mid-block
    assert alloc.cached_blocks == 1
    assert alloc.reserve(hashes, 5).cached_tokens == BLOCK_SIZE


def test_other_namespaces_never_share():
    alloc = BlockAllocator(32, BLOCK_SIZE)
    _published(alloc, ("tenant-a", "adapter"), PROMPT, 4)
    for namespace in (("tenant-b", "adapter"), ("tenant-a", "other"), ("tenant-a", None)):
        other = alloc.reserve(alloc.prefix_hashes(namespace, PROMPT), 4)
        assert other.cached_tokens == 0, namespace


def test_allocate_prefers_never_cached_blocks_then_evicts_least_recently_used():
    alloc = BlockAllocator(7, BLOCK_SIZE)  # 6 usable blocks
    old_hashes, old = _published(alloc, "ns", PROMPT[:4], 1)
    new_hashes, new = _published(alloc, "ns", PROMPT[4:8], 1)
    alloc.free(old.blocks)
    alloc.free(new.blocks)
    assert alloc.free_blocks == 6 and alloc.cached_blocks == 2
    fresh = alloc.allocate(4)
    assert not set(fresh) & set(old.blocks + new.blocks), "evicted while never-cached were free"
    evicting = alloc.allocate(1)
    assert evicting == old.blocks, "not the least recently used"
    assert alloc.reserve(old_hashes, 1).cached_tokens == 0, "evicted block still matched"
    assert alloc.reserve(new_hashes, 1) is None, "no block was free"


def test_a_refused_reservation_changes_nothing():
    alloc = BlockAllocator(6, BLOCK_SIZE)  # 5 usable
    hashes, first = _published(alloc, "ns", PROMPT, 4)
    alloc.free(first.blocks)
    before = (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks, alloc.counters.hit_blocks)
    assert alloc.reserve(hashes, 9) is None  # 3 shared + 6 fresh > 5 usable
    after = (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks, alloc.counters.hit_blocks)
    assert after == before
    assert alloc.reserve(hashes, 5).cached_tokens == 3 * BLOCK_SIZE
