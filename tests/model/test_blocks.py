"""KV block accounting and the prefix cache: references, sharing within a namespace only, the
prompt tokens past the shared blocks copied from a cached block as far as they match,
least-recently-used eviction of unreferenced cached blocks, nothing changed by a refusal."""

from __future__ import annotations

import pytest

from loraserve.model.blocks import SCRATCH_BLOCK, BlockAllocator, BlockCopy

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
    chain = alloc.prefix_chain(namespace, tokens)
    reservation = alloc.reserve(total_blocks, chain, tokens)
    alloc.publish(chain, reservation.blocks, tokens, len(tokens))
    return chain, reservation


def test_chains_hash_full_blocks_and_depend_on_namespace_and_every_earlier_token():
    alloc = BlockAllocator(8, BLOCK_SIZE)
    chain = alloc.prefix_chain("a", PROMPT)
    assert len(chain) == 1 + len(PROMPT) // BLOCK_SIZE == 4  # the namespace's digest first
    assert alloc.prefix_chain("a", PROMPT[:8]) == chain[:3]
    assert not set(alloc.prefix_chain("b", PROMPT)) & set(chain)
    changed = [PROMPT[0] + 1, *PROMPT[1:]]
    assert all(x != y for x, y in zip(alloc.prefix_chain("a", changed)[1:], chain[1:]))


def test_a_chain_goes_on_from_the_one_known():
    alloc = BlockAllocator(8, BLOCK_SIZE)
    first = alloc.prefix_chain("a", PROMPT[:5])
    assert alloc.prefix_chain("a", PROMPT, known=first) == alloc.prefix_chain("a", PROMPT)
    assert alloc.prefix_chain("a", PROMPT[:6], known=first) == first


def test_a_published_prefix_is_shared_and_its_blocks_referenced_by_both():
    alloc = BlockAllocator(16, BLOCK_SIZE)
    chain, first = _published(alloc, "t/a", PROMPT, 5)
    assert first.cached_tokens == 0 and first.copy is None
    second = alloc.reserve(5, chain, PROMPT)
    assert second.cached_tokens == 3 * BLOCK_SIZE and second.copy is None
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
    chain = alloc.prefix_chain("ns", PROMPT)
    reservation = alloc.reserve(5, chain, PROMPT)
    alloc.publish(chain, reservation.blocks, PROMPT, 7)  # a prefill chunk ending mid-block
    assert alloc.cached_blocks == 1
    assert alloc.reserve(5, chain, PROMPT).cached_tokens == BLOCK_SIZE


def test_a_prompt_cached_whole_copies_its_last_block_but_its_last_token():
    """12 tokens, 3 full blocks: the first 2 shared, the third copied but for its last
    position, which the sequence computes (and goes on writing after)."""
    alloc = BlockAllocator(16, BLOCK_SIZE)
    prompt = PROMPT[:12]
    chain, first = _published(alloc, "ns", prompt, 4)
    second = alloc.reserve(4, chain, prompt)
    assert second.cached_tokens == 11
    assert second.blocks[:2] == first.blocks[:2]
    assert second.copy == BlockCopy(source=first.blocks[2], target=second.blocks[2], tokens=3)
    assert second.blocks[2] not in first.blocks, "the copy's target is not the sequence's own"
    assert (alloc.counters.hit_blocks, alloc.counters.copied_tokens) == (2, 3)
    alloc.free(first.blocks)
    assert alloc.used_blocks == 5, "the copy's source was not held until copied"
    alloc.free([second.copy.source])
    alloc.free(second.blocks)
    assert alloc.used_blocks == 0


@pytest.mark.parametrize(
    ("prompt", "cached"),
    [
        (PROMPT[:10], 9),  # ends inside a longer prompt's third block: all but its last token
        ([*PROMPT[:10], 999], 10),  # goes on differently: the tokens the two have in common
        ([*PROMPT[:8], 999, 998], 8),  # differs at the first token past the shared blocks
        ([PROMPT[0] + 1, *PROMPT[1:]], 0),  # differs in the first block: nothing continues it
    ],
)
def test_tokens_past_the_shared_blocks_are_copied_as_far_as_they_match(prompt, cached):
    alloc = BlockAllocator(16, BLOCK_SIZE)
    _, first = _published(alloc, "ns", PROMPT, 4)
    reservation = alloc.reserve(4, alloc.prefix_chain("ns", prompt), prompt)
    assert reservation.cached_tokens == cached
    copied = cached % BLOCK_SIZE
    if copied:
        assert reservation.copy == BlockCopy(first.blocks[2], reservation.blocks[2], copied)
    else:
        assert reservation.copy is None


def test_a_partly_filled_block_is_copied_from_never_shared_and_evicted_like_the_rest():
    """A finished sequence of 10 tokens: 2 full blocks published, its third block's 2 tokens
    offered for copying. A 13-token prompt that goes on past them shares the 2 full blocks
    and copies the 2 tokens, not a third shared block."""
    alloc = BlockAllocator(6, BLOCK_SIZE)  # 5 usable
    chain, first = _published(alloc, "ns", PROMPT[:10], 3)
    alloc.publish_partial(chain[2], first.blocks[2], PROMPT[8:10])
    alloc.free(first.blocks)
    assert alloc.cached_blocks == 3
    prompt = PROMPT[:13]
    reservation = alloc.reserve(4, alloc.prefix_chain("ns", prompt), prompt)
    assert reservation.cached_tokens == 10
    assert reservation.copy == BlockCopy(first.blocks[2], reservation.blocks[2], 2)
    alloc.free([reservation.copy.source])
    alloc.free(reservation.blocks)
    alloc.free(alloc.allocate(5))  # every cached block evicted, the partial one too
    assert alloc.cached_blocks == 0
    again = alloc.reserve(4, alloc.prefix_chain("ns", prompt), prompt)
    assert again.cached_tokens == 0 and again.copy is None


@pytest.mark.parametrize("tokens", [[], PROMPT[:BLOCK_SIZE]])
def test_a_partial_block_holds_fewer_than_a_block_of_tokens_and_some(tokens):
    alloc = BlockAllocator(4, BLOCK_SIZE)
    with pytest.raises(ValueError, match="not a partial block"):
        alloc.publish_partial(alloc.prefix_chain("ns", [])[0], 1, tokens)


def test_a_copy_that_would_leave_too_few_free_blocks_is_not_made():
    """4 usable blocks, 3 of them a published 12-token prompt's, unreferenced: a sequence of
    4 blocks shares 2 and needs 2 fresh ones, which only the copy's source can be one of."""
    alloc = BlockAllocator(5, BLOCK_SIZE)
    prompt = PROMPT[:12]
    chain, first = _published(alloc, "ns", prompt, 3)
    alloc.free(first.blocks)
    reservation = alloc.reserve(4, chain, prompt)
    assert reservation.cached_tokens == 2 * BLOCK_SIZE and reservation.copy is None
    assert first.blocks[2] in reservation.blocks[2:], "the last free block was not taken"


def test_without_a_chain_nothing_is_looked_up():
    alloc = BlockAllocator(16, BLOCK_SIZE)
    _published(alloc, "ns", PROMPT, 4)
    counted = (alloc.counters.queried_blocks, alloc.counters.hit_blocks)
    reservation = alloc.reserve(4, (), PROMPT)  # prefix caching off
    assert reservation.cached_tokens == 0 and reservation.copy is None
    assert (alloc.counters.queried_blocks, alloc.counters.hit_blocks) == counted


def test_other_namespaces_never_share():
    alloc = BlockAllocator(32, BLOCK_SIZE)
    _published(alloc, ("tenant-a", "adapter"), PROMPT, 4)
    for namespace in (("tenant-b", "adapter"), ("tenant-a", "other"), ("tenant-a", None)):
        other = alloc.reserve(4, alloc.prefix_chain(namespace, PROMPT), PROMPT)
        assert other.cached_tokens == 0 and other.copy is None, namespace


def test_allocate_prefers_never_cached_blocks_then_evicts_least_recently_used():
    alloc = BlockAllocator(7, BLOCK_SIZE)  # 6 usable blocks
    old_chain, old = _published(alloc, "ns", PROMPT[:4], 1)
    new_chain, new = _published(alloc, "ns", PROMPT[4:8], 1)
    alloc.free(old.blocks)
    alloc.free(new.blocks)
    assert alloc.free_blocks == 6 and alloc.cached_blocks == 2
    fresh = alloc.allocate(4)
    assert not set(fresh) & set(old.blocks + new.blocks), "evicted while never-cached were free"
    evicting = alloc.allocate(1)
    assert evicting == old.blocks, "not the least recently used"
    assert alloc.reserve(1, old_chain, PROMPT[:4]).copy is None, "evicted block still matched"
    assert alloc.reserve(1, new_chain, PROMPT[4:8]) is None, "no block was free"


def test_a_refused_reservation_changes_nothing():
    alloc = BlockAllocator(6, BLOCK_SIZE)  # 5 usable
    chain, first = _published(alloc, "ns", PROMPT, 4)
    alloc.free(first.blocks)
    before = (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks, alloc.counters.hit_blocks)
    assert alloc.reserve(9, chain, PROMPT) is None  # 3 shared + 6 fresh > 5 usable
    after = (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks, alloc.counters.hit_blocks)
    assert after == before
    assert alloc.reserve(5, chain, PROMPT).cached_tokens == 3 * BLOCK_SIZE
