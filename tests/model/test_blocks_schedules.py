"""The prefix cache under any schedule of sequences arriving, writing and finishing, against a
model of what the pools hold: every position a reservation says is cached (shared or copied)
holds the KV of the same token at the same position under the same namespace, so nothing is
ever read from another tenant's or adapter's prompt or from a stale block; no sequence writes
into a block another live sequence reads; every reference is given back."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from loraserve.model.blocks import BlockAllocator

BLOCK_SIZE = 4
NUM_BLOCKS = 12  # 11 usable: eviction and refusals happen often
NAMESPACES = ("acme/a", "acme/b", "globex/a")

# What a pool position holds: the KV of (namespace, position, token, prefix), or None.
Held = tuple[str, int, tuple[int, ...]] | None


@dataclass
class Live:
    namespace: str
    tokens: list[int]  # prompt, then generated
    prompt_len: int
    blocks: list[int]
    chain: list[bytes]
    computed: int = 0


class Pools:
    """The model: what each block's positions hold."""

    def __init__(self) -> None:
        self.held: dict[int, list[Held]] = {}

    def write(self, block: int, offset: int, value: Held) -> None:
        self.held.setdefault(block, [None] * BLOCK_SIZE)[offset] = value

    def read(self, block: int, offset: int) -> Held:
        return self.held.get(block, [None] * BLOCK_SIZE)[offset]

    def copy(self, source: int, target: int, positions: int) -> None:
        for offset in range(positions):
            self.write(target, offset, self.read(source, offset))


def _kv(seq: Live, position: int) -> Held:
    """The KV a sequence computes at `position`: it depends on every token up to it."""
    return (seq.namespace, position, tuple(seq.tokens[: position + 1]))


def _compute(alloc: BlockAllocator, pools: Pools, seq: Live, upto: int,
             others: list[Live]) -> None:  # fmt: skip
    """Write positions computed..upto - 1, as a forward would, and publish what is full."""
    for position in range(seq.computed, upto):
        block = seq.blocks[position // BLOCK_SIZE]
        readers = [o for o in others if block in o.blocks]
        assert not readers, f"block {block} written while another sequence holds it"
        pools.write(block, position % BLOCK_SIZE, _kv(seq, position))
    seq.computed = upto
    full = upto // BLOCK_SIZE
    if full >= len(seq.chain):
        seq.chain = alloc.prefix_chain(seq.namespace, seq.tokens[: full * BLOCK_SIZE], seq.chain)
    alloc.publish(seq.chain, seq.blocks, seq.tokens, upto)


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.sampled_from(NAMESPACES),
            st.lists(st.integers(0, 2), min_size=1, max_size=14),  # few tokens: many matches
            st.integers(1, 6),  # new tokens
        ),
        st.tuples(st.just("finish"), st.integers(0, 7)),
        st.tuples(  # a next turn: a finished sequence's tokens (its answer's last never fed)
            st.just("follow"),
            st.integers(0, 7),
            st.lists(st.integers(0, 2), max_size=6),
            st.integers(1, 6),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(operations=OPERATIONS)
def test_cached_positions_hold_the_same_tokens_kv_under_any_schedule(operations):
    alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
    pools = Pools()
    live: list[Live] = []
    finished: list[Live] = []
    for operation in operations:
        if operation[0] == "follow" and finished:
            _, which, more, new_tokens = operation
            earlier = finished[which % len(finished)]
            operation = ("admit", earlier.namespace, earlier.tokens + more, new_tokens)
        if operation[0] == "admit":
            _, namespace, prompt, new_tokens = operation
            chain = alloc.prefix_chain(namespace, prompt)
            total = alloc.blocks_for(len(prompt) + new_tokens)
            reservation = alloc.reserve(total, chain, prompt)
            if reservation is None:
                continue
            seq = Live(namespace, list(prompt), len(prompt), reservation.blocks, chain)
            if reservation.copy is not None:
                copy = reservation.copy
                assert copy.source not in seq.blocks and copy.target in seq.blocks
                pools.copy(copy.source, copy.target, copy.tokens)
                alloc.free([copy.source])
            assert reservation.cached_tokens < len(prompt), "the last token must run"
            for position in range(reservation.cached_tokens):
                block = seq.blocks[position // BLOCK_SIZE]
                assert pools.read(block, position % BLOCK_SIZE) == _kv(seq, position)
            seq.computed = reservation.cached_tokens
            _compute(alloc, pools, seq, len(prompt), live)
            for token in range(new_tokens - 1):  # generated tokens, each fed back
                seq.tokens.append(token % 3)
                _compute(alloc, pools, seq, len(seq.tokens), live)
            seq.tokens.append(0)  # the last generated token: never fed
            live.append(seq)
        elif operation[0] == "finish" and live:
            seq = live.pop(operation[1] % len(live))
            finished.append(seq)
            full, filled = divmod(seq.computed, BLOCK_SIZE)
            if filled and full < len(seq.chain):  # as the engine does for a finished sequence
                computed = seq.tokens[full * BLOCK_SIZE : seq.computed]
                alloc.publish_partial(seq.chain[full], seq.blocks[full], computed)
            alloc.free(seq.blocks)
        held = {block for seq in live for block in seq.blocks}
        assert alloc.used_blocks == len(held), "a reference was kept or lost"
    for seq in live:
        alloc.free(seq.blocks)
    assert alloc.used_blocks == 0
