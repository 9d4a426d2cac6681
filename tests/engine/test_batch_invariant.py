"""`batch_invariant`: a request's logits have the same bits alone, beside other requests on
other adapters joining and leaving, with its prompt split into chunks (one of them a single
token), with its prompt's prefix found in the prefix cache (the tokens past its shared blocks
copied from a cached block), and with drafted tokens checked in its decode steps; in fp32 and
in bf16 compute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.engine.helpers import Collected, make_core, run

from loraserve.engine.core import EngineCore
from loraserve.engine.speculation import PromptLookup
from loraserve.types import GenerateRequest, SamplingParams

PROMPT = 300  # tokens: past a decode row's one-part length, prefilled in one chunk or several
NEW_TOKENS = 8


def _prompt(seed: int, length: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 500, (length,), generator=generator).tolist())


def _request(prompt: tuple[int, ...], adapter: str | None, new_tokens: int = NEW_TOKENS):
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return GenerateRequest(prompt_token_ids=prompt, adapter=adapter, sampling=sampling)


PROBE = _request(_prompt(0, PROMPT), "r8-all")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def dtype(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cores(dtype, model_dirs, adapter_dirs):
    """Invariant engines by their max_step_tokens: the whole prompt in one step, in chunks of
    37, and in 299 tokens then one."""

    def core(max_step_tokens: int) -> EngineCore:
        made = make_core(
            model_dirs["llama"], dtype=dtype, batch_invariant=True, max_context=1024,
            kv_cache_tokens=8192, max_step_tokens=max_step_tokens, max_batch_size=32,
        )  # fmt: skip
        for name in ("r8-all", "r4-attn"):
            made.adapters.load(name, adapter_dirs["llama"][name])
        return made

    return {tokens: core(tokens) for tokens in (2048, 37, 299)}


@pytest.fixture(scope="module")
def alone(cores) -> Collected:
    [probe] = run(cores[2048], {0: [PROBE]})
    assert len(probe.tokens) == NEW_TOKENS
    return probe


def _assert_same_bits(got: Collected, want: Collected) -> None:
    assert got.tokens == want.tokens
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert torch.equal(a, b), f"token {step}: logits differ by {(a - b).abs().max()}"


def test_beside_requests_joining_and_leaving(cores, alone):
    crowd = {
        0: [_request(_prompt(1, 40), "r4-attn", 3), _request(_prompt(2, 7), None, 12)],
        1: [_request(_prompt(3, 120), "r8-all", 5)],
        3: [_request(_prompt(4, 18), "r4-attn", 2), _request(_prompt(5, 260), None, 9)],
        5: [_request(_prompt(6, 3), "r8-all", 1)],
    }
    crowd[0].insert(1, PROBE)
    results = run(cores[2048], crowd)
    _assert_same_bits(results[1], alone)


# Other requests: (step it arrives at, prompt tokens, adapter, new tokens).
OTHERS = st.lists(
    st.tuples(
        st.integers(0, 6),
        st.integers(1, 200),
        st.sampled_from([None, "r8-all", "r4-attn"]),
        st.integers(1, 12),
    ),
    max_size=8,
)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same schedules every run
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(others=OTHERS, probe_step=st.integers(0, 4), max_step_tokens=st.sampled_from([2048, 37]))
def test_beside_any_schedule_of_other_requests(cores, alone, others, probe_step, max_step_tokens):
    arrivals: dict[int, list[GenerateRequest]] = {}
    for i, (step, length, adapter, new_tokens) in enumerate(others):
        arrivals.setdefault(step, []).append(_request(_prompt(10 + i, length), adapter, new_tokens))
    arrivals.setdefault(probe_step, []).append(PROBE)
    results = run(cores[max_step_tokens], arrivals)
    order = [request for step in sorted(arrivals) for request in arrivals[step]]
    _assert_same_bits(results[next(i for i, r in enumerate(order) if r is PROBE)], alone)


@pytest.mark.parametrize("max_step_tokens", [37, 299])
def test_with_the_prompt_in_chunks(cores, alone, max_step_tokens):
    [probe] = run(cores[max_step_tokens], {0: [PROBE]})
    _assert_same_bits(probe, alone)


def test_with_the_prompt_prefix_from_the_cache(cores, alone):
    core = cores[2048]
    shared = PROBE.prompt_token_ids[:288] + _prompt(7, 12)  # 18 full blocks of 16 in common
    run(core, {0: [_request(shared, "r8-all", 1)]})
    hits = core.allocator.counters.hit_blocks
    [probe] = run(core, {0: [PROBE]})
    assert core.allocator.counters.hit_blocks - hits == 18
    _assert_same_bits(probe, alone)


def test_with_the_prompt_tokens_past_the_shared_blocks_copied(cores, alone):
    """A prompt that holds the probe's and 4 tokens more (19 full blocks) gives the probe its
    first 18 blocks and 11 of the next one's tokens: the probe computes only its last token.
    Sent again, the longer prompt copies 15 tokens of its own last block."""
    core = cores[2048]
    counters = core.allocator.counters
    longer = _request(PROBE.prompt_token_ids + _prompt(9, 4), "r8-all")
    [first] = run(core, {0: [longer]})
    copied = counters.copied_tokens
    [probe] = run(core, {0: [PROBE]})
    assert counters.copied_tokens - copied == 11
    _assert_same_bits(probe, alone)
    copied = counters.copied_tokens
    [again] = run(core, {0: [longer]})
    assert counters.copied_tokens - copied == 15
    _assert_same_bits(again, first)


def test_a_next_turn_shares_its_prompt_blocks_only(dtype, cores, model_dirs, adapter_dirs):
    """A decode row's KV has other bits than the same tokens' as a prompt's, so the blocks an
    answer fills are not published: a next turn (prompt, answer, 5 tokens more) shares the
    prompt's 18 blocks, not the 19th its answer filled, and its logits are those computed
    afresh."""
    core = cores[2048]
    [answer] = run(core, {0: [PROBE]})
    follow_up = _request(PROBE.prompt_token_ids + tuple(answer.tokens) + _prompt(8, 5), "r8-all")
    hits = core.allocator.counters.hit_blocks
    [got] = run(core, {0: [follow_up]})
    assert core.allocator.counters.hit_blocks - hits == PROMPT // 16
    fresh = make_core(
        model_dirs["llama"], dtype=dtype, batch_invariant=True, prefix_caching=False,
        max_context=1024,
    )  # fmt: skip
    fresh.adapters.load("r8-all", adapter_dirs["llama"]["r8-all"])
    [want] = run(fresh, {0: [follow_up]})
    _assert_same_bits(got, want)


def test_with_drafted_tokens_checked_in_the_step(dtype, model_dirs, adapter_dirs, alone):
    """Single-token lookups over a prompt of random tokens draft at most steps; each checked
    position's logits are a one-token step's, kept drafts or not (in bf16 too, where without
    batch_invariant they round apart)."""
    core = make_core(
        model_dirs["llama"], dtype=dtype, batch_invariant=True, max_context=1024,
        speculative_tokens=4, drafter=PromptLookup(min_ngram=1),
    )  # fmt: skip
    core.adapters.load("r8-all", adapter_dirs["llama"]["r8-all"])
    [probe] = run(core, {0: [PROBE]})
    sample = core.metrics.registry.get_sample_value
    assert sample("loraserve_draft_tokens_total", {"result": "rejected"}) > 0
    _assert_same_bits(probe, alone)


@pytest.mark.parametrize("quantize_output", ["4bit", "int8"])
def test_with_a_quantized_output_projection(dtype, quantize_output, model_dirs, adapter_dirs):
    """`quantize_output` keeps the logits' bits the probe's own: its 4-bit (8-bit) kernel takes
    the invariant paths too."""
    core = make_core(
        model_dirs["llama"], dtype=dtype, batch_invariant=True, quantize_output=quantize_output,
        max_context=1024, kv_cache_tokens=8192, max_batch_size=32,
    )  # fmt: skip
    for name in ("r8-all", "r4-attn"):
        core.adapters.load(name, adapter_dirs["llama"][name])
    [alone] = run(core, {0: [PROBE]})
    crowd = {
        0: [_request(_prompt(1, 40), "r4-attn", 3), PROBE, _request(_prompt(2, 7), None, 12)],
        2: [_request(_prompt(5, 260), None, 9), _request(_prompt(6, 3), "r8-all", 1)],
    }
    _assert_same_bits(run(core, crowd)[1], alone)


@pytest.mark.parametrize(
    ("arch", "quantization", "refusal"),
    [
        ("gemma2", "nf4", "softcapping or attention sinks"),  # its eager attention
        ("llama", "int8", "would run through torch"),  # no kernel reads int8 weights
    ],
)
def test_what_the_kernels_cannot_hold_invariant_is_refused_at_start(
    model_dirs, arch, quantization, refusal
):
    with pytest.raises(ValueError, match=refusal):
        make_core(model_dirs[arch], quantization, batch_invariant=True)
