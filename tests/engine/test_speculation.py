"""Drafted tokens checked in the decode step (`speculative_tokens`): greedy outputs, their
log-probabilities and finish reasons are those of decoding one token a step, whether every
drafted token is kept, none is, or some are; sampled, penalised and constrained rows never
draft; prompt lookup finds the latest earlier occurrence of the longest suffix."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
from tests.engine.helpers import Collected, make_core, run

from loraserve.engine.sequence import Sequence
from loraserve.engine.speculation import Drafter, PromptLookup, Speculation
from loraserve.types import FinishReason, GenerateRequest, SamplingParams

DRAFT = 4
LOGPROB_TOLERANCE = 1e-5  # rows of several tokens and other batches: float32 rounding


def _seq(tokens: list[int], request_id: int = 1, **sampling) -> Sequence:
    params = SamplingParams(max_new_tokens=64, **sampling)
    return Sequence(
        request_id=request_id,
        prompt_len=len(tokens),
        token_ids=list(tokens),
        params=params,
        adapter_key=None,
        kv_tokens=len(tokens) + 64,
        detokenizer=None,
        generator=None,
        emit=lambda event: None,
    )


# ---- prompt lookup --------------------------------------------------------------------------


def test_lookup_takes_the_longest_suffix_at_its_latest_occurrence():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    # "1 2 3" occurred once (followed by 10 11); "2 3" later too (followed by 20)
    tokens = [1, 2, 3, 10, 11, 7, 2, 3, 20, 8, 1, 2, 3]
    assert lookup.propose(_seq(tokens), 2) == [10, 11]
    assert PromptLookup(max_ngram=2, min_ngram=1).propose(_seq(tokens), 2) == [20, 8]


def test_lookup_without_an_earlier_occurrence_drafts_nothing():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose(_seq([1, 2, 3, 4, 5, 3]), 4) == []  # only a 1-gram repeats
    assert lookup.propose(_seq([7]), 4) == []


def test_lookup_matches_whole_tokens_only():
    # tokens whose little-endian bytes would hold (1, 0)'s from their second byte on, and ids
    # with digits of every size
    lookup = PromptLookup(max_ngram=2, min_ngram=2)
    assert lookup.propose(_seq([256, 0, 0, 6, 1, 0]), 1) == []
    assert lookup.propose(_seq([1, 0, 9, 256, 0, 0, 6, 1, 0]), 1) == [9]
    big = [65_025, 255, 254, 151_935, 255]
    assert lookup.propose(_seq([*big, 7, 254, 151_935]), 2) == [255, 7]
    assert lookup.propose(_seq([255, 0, 255, 1, 0]), 1) == []


def test_lookup_continues_a_loop_past_the_end_of_the_context():
    # the suffix (8, 9) last occurred two tokens back: the text repeats with period 2
    assert PromptLookup().propose(_seq([4, 8, 9, 8, 9]), 5) == [8, 9, 8, 9, 8]


def test_lookup_follows_a_growing_sequence():
    lookup = PromptLookup(max_ngram=2, min_ngram=2)
    seq = _seq([1, 2, 3, 4])
    assert lookup.propose(seq, 2) == []
    seq.token_ids += [1, 2]  # generated: the mirror catches up
    assert lookup.propose(seq, 2) == [3, 4]


def test_only_greedy_unconstrained_rows_draft_within_their_limits():
    lookup = PromptLookup()
    speculation = Speculation(lookup, max_tokens=3, max_rows=4)
    looping = [4, 8, 9, 8, 9]
    greedy = _seq(looping, 1)
    sampled = _seq(looping, 2, temperature=0.7)
    penalised = _seq(looping, 3, repetition_penalty=1.2)
    nearly_done = _seq(looping, 4)
    nearly_done.params = replace(nearly_done.params, max_new_tokens=2)
    drafts = speculation.drafts([greedy, sampled, penalised, nearly_done], budget=100)
    # one token left to generate after the pending one's: it needs no KV, so no draft of two
    assert drafts == {1: [8, 9, 8], 4: [8]}
    assert speculation.drafts([greedy, nearly_done], budget=2) == {1: [8, 9]}
    busy = [_seq(looping, i) for i in range(5)]
    assert speculation.drafts(busy, budget=100) == {}


def test_a_sequence_whose_drafts_keep_nothing_drafts_ever_more_rarely():
    speculation = Speculation(PromptLookup(), max_tokens=2, max_rows=1)
    seq = _seq([4, 8, 9, 8, 9])

    def drafting_steps(steps: int, kept: int) -> list[int]:
        drafted = []
        for step in range(steps):
            if speculation.drafts([seq], budget=10):
                drafted.append(step)
                speculation.checked(seq, kept)
        return drafted

    # misses pause it for 1, 2, 4, 8 steps, then 16 at most
    assert drafting_steps(64, kept=0) == [0, 2, 5, 10, 19, 36, 53]
    assert drafting_steps(17, kept=1)[:1] == [6]  # the last pause (16 from step 53) runs out
    assert drafting_steps(3, kept=1) == [0, 1, 2]  # ... and a kept token ends it


# ---- the engine -----------------------------------------------------------------------------

LOOP = [11, 12, 13, 14, 15] * 6
REQUESTS = [
    (LOOP, None, 14),
    ([40 + i for i in range(20)], "r8-all", 9),
    ([*LOOP[:17], 7, 7, 7], "r4-attn", 1),
    ([3, 4] * 10, None, 2),
    ([90 + (i * 7) % 31 for i in range(24)] * 2, "r16-mlp", 12),
]


def _requests(**sampling) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            prompt_token_ids=tuple(prompt),
            adapter=adapter,
            sampling=SamplingParams(
                max_new_tokens=max_new, ignore_eos=True, top_logprobs=2, **sampling
            ),
        )
        for prompt, adapter, max_new in REQUESTS
    ]


class ReplayDrafter:
    """Drafts what the reference run generated next (every draft right), or with `wrong`, a
    token it did not (every draft wrong)."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]], wrong_in: int = 0) -> None:
        self.outputs = outputs
        self.wrong_in = wrong_in  # the vocabulary's size, to draft wrong tokens in it

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        reference = self.outputs[tuple(seq.token_ids[: seq.prompt_len])]
        ahead = reference[seq.num_generated : seq.num_generated + limit]
        return [(t + 1) % self.wrong_in for t in ahead] if self.wrong_in else ahead


class SwitchedDrafter:
    """The drafting core's drafter: each test says which one drafts."""

    def __init__(self) -> None:
        self.drafter = PromptLookup()

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        return self.drafter.propose(seq, limit)


@pytest.fixture(scope="module")
def drafter() -> SwitchedDrafter:
    return SwitchedDrafter()


@pytest.fixture(scope="module")
def cores(model_dirs, adapter_dirs, drafter):
    made = {}
    for tokens in (0, DRAFT):
        core = make_core(
            model_dirs["llama"],
            max_context=1024,
            speculative_tokens=tokens,
            speculative_max_rows=8,
            prefix_caching=False,  # each run feeds its whole prompts (`_fed`)
            drafter=drafter,
        )
        for name in ("r8-all", "r4-attn", "r16-mlp"):
            core.adapters.load(name, adapter_dirs["llama"][name])
        made[tokens] = core
    return made


def _drafted(core) -> tuple[float, float]:
    sample = core.metrics.registry.get_sample_value
    return (
        sample("loraserve_draft_tokens_total", {"result": "accepted"}),
        sample("loraserve_draft_tokens_total", {"result": "rejected"}),
    )


def _fed(core) -> float:
    """Tokens fed to the model so far."""
    return core.metrics.registry.get_sample_value("loraserve_step_tokens_sum")


def _assert_same(got: list[Collected], want: list[Collected]) -> None:
    for g, w in zip(got, want):
        assert g.error is None and w.error is None
        assert g.tokens == w.tokens
        assert g.text == w.text
        assert (g.final.finish_reason, g.final.completion_tokens) == (
            w.final.finish_reason,
            w.final.completion_tokens,
        )
        for a, b in zip(g.logprobs, w.logprobs):
            assert abs(a - b) < LOGPROB_TOLERANCE
        assert [[t.token_id for t in top] for top in g.top_logprobs] == [
            [t.token_id for t in top] for top in w.top_logprobs
        ]


@pytest.fixture(scope="module")
def reference(cores):
    """Each request alone and all together, one token a step."""
    together = run(cores[0], {0: _requests()})
    return {tuple(p): c.tokens for (p, _, _), c in zip(REQUESTS, together)}, together


@contextmanager
def drafting_with(switched: SwitchedDrafter, drafter: Drafter):
    switched.drafter = drafter
    try:
        yield
    finally:
        switched.drafter = PromptLookup()


def test_prompt_lookup_drafts_give_the_same_outputs(cores, drafter, reference):
    _, want = reference
    # a prompt of every token: whatever the model writes next occurred before, so a lookup
    # of single tokens drafts at every step (what the drafts hold is up to the weights)
    every_token = GenerateRequest(
        prompt_token_ids=tuple(range(cores[0].vocab_size)),
        sampling=SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True),
    )
    [want_every] = run(cores[0], {0: [every_token]})
    core = cores[DRAFT]
    accepted, rejected = _drafted(core)
    with drafting_with(drafter, PromptLookup(min_ngram=1)):
        got = run(core, {0: [*_requests()[:3], every_token], 2: _requests()[3:]})
    _assert_same(got, [*want[:3], want_every, *want[3:]])
    now_accepted, now_rejected = _drafted(core)
    # every decode step of that request drafts, but those a draft that kept nothing pauses
    assert now_accepted + now_rejected - accepted - rejected >= 4, "too few steps drafted"


def test_drafts_all_kept_take_fewer_steps_for_the_same_outputs(cores, drafter, reference):
    outputs, want = reference
    core = cores[DRAFT]
    accepted, rejected = _drafted(core)
    steps, fed = core.steps, _fed(core)
    with drafting_with(drafter, ReplayDrafter(outputs)):
        got = run(core, {0: _requests()})
    _assert_same(got, want)
    now_accepted, now_rejected = _drafted(core)
    assert now_rejected == rejected
    # each token fed once: the prompts, and every generated token but the last of each request
    prompts = sum(len(prompt) for prompt, _, _ in REQUESTS)
    assert _fed(core) - fed == prompts + sum(len(t) - 1 for t in outputs.values())
    # every generated token but each request's first (from the prefill) and the ones chosen
    # after a full draft or at its end is a kept draft
    assert now_accepted - accepted >= sum(len(t) for t in outputs.values()) / 2
    longest = max(max_new for _, _, max_new in REQUESTS)
    assert core.steps - steps <= 1 + -(-(longest - 1) // (DRAFT + 1))


def test_drafts_all_wrong_give_the_same_outputs(cores, drafter, reference):
    outputs, want = reference
    core = cores[DRAFT]
    accepted, rejected = _drafted(core)
    with drafting_with(drafter, ReplayDrafter(outputs, wrong_in=core.vocab_size)):
        got = run(core, {0: _requests()})
    _assert_same(got, want)
    now_accepted, now_rejected = _drafted(core)
    assert now_accepted == accepted and now_rejected > rejected


def test_a_stop_sequence_inside_a_kept_draft_ends_the_output_where_it_would(
    cores, drafter, reference
):
    outputs, want = reference
    text = want[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    assert stop.strip(), text
    request = _requests(stop=(stop,))[0]
    [plain] = run(cores[0], {0: [request]})
    assert plain.final.finish_reason is FinishReason.STOP
    with drafting_with(drafter, ReplayDrafter(outputs)):
        [drafted] = run(cores[DRAFT], {0: [request]})
    _assert_same([drafted], [plain])


def test_sampled_rows_beside_drafting_ones_draw_as_without_drafts(cores, drafter, reference):
    outputs, _ = reference
    sampled = _requests(temperature=0.8, seed=7)
    greedy = _requests()
    mixed = [sampled[1], greedy[0], sampled[4], greedy[2]]
    want = run(cores[0], {0: mixed})
    with drafting_with(drafter, ReplayDrafter(outputs)):
        got = run(cores[DRAFT], {0: mixed})
    _assert_same(got, want)


def test_bf16_rows_check_drafts_and_feed_each_kept_token_once(model_dirs, adapter_dirs):
    """Under bf16 compute a checked position's sums may round apart from a one-token step's
    (as between batch sizes), so outputs are not compared; the accounting is."""
    core = make_core(
        model_dirs["llama"],
        dtype="bf16",
        max_context=1024,
        speculative_tokens=DRAFT,
        speculative_max_rows=8,
        prefix_caching=False,
        drafter=PromptLookup(min_ngram=1),
    )
    core.adapters.load("r8-all", adapter_dirs["llama"]["r8-all"])
    every_token = tuple(range(core.vocab_size))
    requests = [
        GenerateRequest(
            prompt_token_ids=prompt,
            adapter=adapter,
            sampling=SamplingParams(max_new_tokens=12, ignore_eos=True),
        )
        for prompt, adapter in ((every_token, None), (every_token[::-1], "r8-all"))
    ]
    got = run(core, {0: requests})
    assert [(g.error, len(g.tokens)) for g in got] == [(None, 12)] * 2
    accepted, rejected = _drafted(core)
    assert accepted + rejected > 0
    assert _fed(core) == 2 * len(every_token) + 2 * 11 + rejected
