"""Prefix caching in the engine: a prompt prefix a tenant already sent on the same adapter is
shared, not recomputed, and so are the blocks its answer filled (a conversation's next turn);
a prompt sent again computes only its last token (the rest of its last block copied from a
cached one); other adapters and other tenants never share them; greedy outputs are the same with and
without the cache, with the KV cache in the compute dtype or in fp16 (whose shared blocks hold
the rounded keys and values a recomputed prefix rounds to again)."""

from __future__ import annotations

import pytest
from tests.engine.helpers import make_core, run

from loraserve.types import GenerateRequest, SamplingParams

PREFIX = list(range(20, 60))  # 40 tokens: two full blocks of 16 shared, the third partial
SAMPLING = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _request(suffix: list[int], adapter: str | None, tenant: str) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=tuple(PREFIX + suffix), adapter=adapter, tenant=tenant, sampling=SAMPLING
    )


# (request, blocks the prefix cache must supply when it arrives after the ones before it)
SEQUENCE = [
    (_request([7, 8, 9], "r8-all", "acme"), 0),
    (_request([10, 11], "r8-all", "acme"), 2),  # same tenant, same adapter: shared
    (_request([10, 11], "r4-attn", "acme"), 0),  # another adapter
    (_request([10, 11], None, "acme"), 0),  # the base model is another namespace too
    (_request([10, 11], "r8-all", "globex"), 0),  # another tenant, same adapter name
    (_request([12], None, "acme"), 2),  # the base prefix acme sent above
]


@pytest.fixture(scope="module", params=["compute", "fp16", "int8"])
def cores(request, model_dirs, adapter_dirs):
    made = {}
    for caching in (True, False):
        core = make_core(model_dirs["llama"], prefix_caching=caching, kv_cache_dtype=request.param)
        for name in ("r8-all", "r4-attn"):
            core.adapters.load(name, adapter_dirs["llama"][name])
        made[caching] = core
    return made


def test_shared_only_within_tenant_and_adapter_with_identical_outputs(cores):
    cached, uncached = cores[True], cores[False]
    for request, shared_blocks in SEQUENCE:
        hits_before = cached.allocator.counters.hit_blocks
        [with_cache] = run(cached, {0: [request]})
        assert cached.allocator.counters.hit_blocks - hits_before == shared_blocks, request
        [without] = run(uncached, {0: [request]})
        assert with_cache.tokens == without.tokens
        for got, want in zip(with_cache.logits, without.logits):
            assert (got - want).abs().max().item() < 1e-3
    assert uncached.allocator.counters.hit_blocks == 0
    assert cached.kv_used_tokens == 0, "a shared block kept a reference after its users left"


def test_cached_prefix_is_shared_by_requests_running_together(cores):
    core = cores[True]
    requests = [_request([30 + i], "r8-all", "initech") for i in range(4)]
    hits_before = core.allocator.counters.hit_blocks
    first, *rest = run(core, {0: requests[:1], 1: requests[1:]})
    assert core.allocator.counters.hit_blocks - hits_before == 2 * len(rest)
    alone = [run(cores[False], {0: [r]})[0].tokens for r in requests]
    assert [first.tokens, *(r.tokens for r in rest)] == alone


@pytest.mark.parametrize(
    ("adapter", "shared_blocks", "copied"), [("r8-all", 4, 5), ("r4-attn", 0, 0)]
)
def test_a_next_turn_shares_the_blocks_the_answer_filled(cores, adapter, shared_blocks, copied):
    """Turn 1: a 40-token prompt, 30 tokens generated (69 in KV: 4 full blocks and 5 positions
    of a fifth). Turn 2, its prompt and answer and 5 tokens more, shares all 4 on the same
    adapter (its prompt alone filled 2) and copies the 5 (so computes only its new tokens and
    the answer's last), none on another."""
    cached, uncached = cores[True], cores[False]
    prompt = tuple(range(100, 140))
    first = GenerateRequest(
        prompt_token_ids=prompt, adapter="r8-all", tenant="umbrella",
        sampling=SamplingParams(max_new_tokens=30, ignore_eos=True),
    )  # fmt: skip
    [answer] = run(cached, {0: [first]})
    follow_up = GenerateRequest(
        prompt_token_ids=prompt + tuple(answer.tokens) + (7, 8, 9, 10, 11),
        adapter=adapter, tenant="umbrella", sampling=SAMPLING,
    )  # fmt: skip
    counters = cached.allocator.counters
    hits_before, copied_before = counters.hit_blocks, counters.copied_tokens
    [with_cache] = run(cached, {0: [follow_up]})
    assert counters.hit_blocks - hits_before == shared_blocks
    assert counters.copied_tokens - copied_before == copied
    [without] = run(uncached, {0: [follow_up]})
    assert with_cache.tokens == without.tokens
    for got, want in zip(with_cache.logits, without.logits):
        assert (got - want).abs().max().item() < 1e-3
    assert cached.kv_used_tokens == 0


@pytest.mark.parametrize("length", [48, 43])
def test_a_prompt_sent_again_computes_only_its_last_token(cores, length):
    """Whole blocks are shared and the tokens after them copied from the cached block that
    holds them: at 48 tokens the prompt's own third block, at 43 the one its answer filled."""
    cached, uncached = cores[True], cores[False]
    request = GenerateRequest(
        prompt_token_ids=tuple(range(200, 200 + length)), adapter="r8-all", tenant="hooli",
        sampling=SAMPLING,
    )  # fmt: skip
    run(cached, {0: [request]})
    counters = cached.allocator.counters
    hits, copied = counters.hit_blocks, counters.copied_tokens
    [again] = run(cached, {0: [request]})
    assert 16 * (counters.hit_blocks - hits) + counters.copied_tokens - copied == length - 1
    [without] = run(uncached, {0: [request]})
    assert again.tokens == without.tokens
    for got, want in zip(again.logits, without.logits):
        assert (got - want).abs().max().item() < 1e-3
    assert cached.kv_used_tokens == 0, "the copied block kept a reference"
