"""Tests for per-row next-token selection: greedy, penalty, filtering, seeding, logprobs, and a
row that cannot be sampled failing alone; logit bias, the allowed-token masks of constrained
rows and the top alternatives."""

from __future__ import annotations

import pytest
import torch

from loraserve.model.sampling import (
    AllowedTokens,
    Sampled,
    apply_logit_bias,
    apply_repetition_penalty,
    make_generator,
    sample_next_tokens,
    unpack_bitmask,
)
from loraserve.types import InvalidRequestError, SamplingParams, TokenBias

VOCAB = 64
GREEDY = SamplingParams()


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    # -> [batch, VOCAB] float32 with a wide spread, so the argmax is unique
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _empty_histories(batch: int) -> list[torch.Tensor]:
    return [torch.zeros(0, dtype=torch.int64)] * batch


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int | None] | None = None,
    histories: list[torch.Tensor] | None = None,
    allowed: AllowedTokens | None = None,
) -> Sampled:
    seeds = seeds if seeds is not None else [0] * len(params)
    generators = [
        None if p.greedy else make_generator(s, "cpu") for p, s in zip(params, seeds, strict=True)
    ]
    histories = histories if histories is not None else _empty_histories(len(params))
    return sample_next_tokens(logits, params, generators, histories, allowed)


def _penalty_reference(row: list[float], history: list[int], penalty: float) -> list[float]:
    out = list(row)
    for token in set(history):
        out[token] = out[token] / penalty if out[token] > 0 else out[token] * penalty
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(8).to(dtype)
    sampled = _sample(logits, [GREEDY] * 8)
    tokens, logprobs = sampled.tokens, sampled.logprobs
    assert sampled.usable.all() and not sampled.errors
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


@pytest.mark.parametrize(
    ("penalty", "history"),
    [
        (1.5, [0, 3, 3, 7, 63]),
        (0.7, [1, 2, 5, 5, 5]),
        (2.0, []),
        (1.0, [0, 1, 2]),
    ],
)
def test_repetition_penalty_matches_reference(penalty: float, history: list[int]) -> None:
    logits = _logits(2)
    scores = logits.clone()
    histories = [torch.tensor(history, dtype=torch.int64), torch.tensor([0, 1, 2])]
    apply_repetition_penalty(scores, [penalty, 1.0], histories)
    expected = _penalty_reference(logits[0].tolist(), history, penalty)
    torch.testing.assert_close(scores[0], torch.tensor(expected))
    assert torch.equal(scores[1], logits[1]), "a row with penalty 1 must be left alone"


@pytest.mark.parametrize(
    ("row", "history", "penalty", "expected"),
    [
        ([4.0, 3.0, 0.0], [0], 2.0, 1),  # positive top logit divided: 2 < 3
        ([-1.0, -1.5, -3.0], [0], 2.0, 1),  # negative top logit multiplied: -2 < -1.5
        ([4.0, 3.0, 0.0], [0], 1.0, 0),  # penalty 1 changes nothing
        ([2.0, 3.0, 0.0], [1, 1, 1], 1.2, 1),  # penalised once: 2.5 > 2, thrice would be 1.74
    ],
)
def test_penalty_steers_greedy_choice(
    row: list[float], history: list[int], penalty: float, expected: int
) -> None:
    logits = torch.tensor([row])
    params = [SamplingParams(repetition_penalty=penalty)]
    tokens = _sample(logits, params, histories=[torch.tensor(history)]).tokens
    assert tokens.tolist() == [expected]
    assert logits.tolist() == [row], "the caller's logits must not be modified"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=0.8, top_k=5, top_p=1e-6),
    ],
)
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(16, seed=1)
    tokens = _sample(logits, [params] * 16, seeds=list(range(16))).tokens
    assert torch.equal(tokens, logits.argmax(dim=-1))


def _expected_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Slow reference: temperature, then top-k, then top-p over the renormalised rest."""
    probs = (logits / p.temperature).softmax(dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept = ranked[: p.top_k] if p.top_k else ranked
    total = sum(probs[t] for t in kept)
    out, mass = torch.zeros(len(probs)), 0.0
    for t in kept:
        if mass >= p.top_p:
            break
        out[t] = probs[t] / total
        mass += probs[t] / total
    return out / out.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=4, top_p=0.9),
    ],
)
def test_sampled_frequencies_follow_the_filtered_softmax(params: SamplingParams) -> None:
    draws = 8000
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    generator = make_generator(1234, "cpu")
    tokens = sample_next_tokens(
        row.expand(draws, -1), [params] * draws, [generator] * draws, _empty_histories(draws)
    ).tokens
    observed = torch.bincount(tokens, minlength=len(row)).float() / draws
    expected = _expected_distribution(row, params)
    torch.testing.assert_close(observed, expected, rtol=0, atol=0.02)
    assert observed[expected == 0].sum() == 0, "a filtered-out token was drawn"


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.3),
    ],
)
def test_seeded_row_is_independent_of_its_batch(position: int, target: SamplingParams) -> None:
    others = [
        GREEDY,
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(repetition_penalty=1.1),
    ]
    steps = 12

    def run(batch: list[SamplingParams], at: int, seeds: list[int | None]) -> list[int]:
        generators = [
            None if p.greedy else make_generator(s, "cpu")
            for p, s in zip(batch, seeds, strict=True)
        ]
        histories = [torch.tensor([1, 2, 3]) for _ in batch]
        chosen = []
        for step in range(steps):
            logits = _logits(len(batch), seed=100 + step)
            logits[at] = _logits(1, seed=step)[0]
            tokens = sample_next_tokens(logits, batch, generators, histories).tokens
            histories = [torch.cat([h, tokens[i : i + 1]]) for i, h in enumerate(histories)]
            chosen.append(int(tokens[at]))
        return chosen

    alone = run([target], 0, [42])
    batch = [*others[:position], target, *others[position:]]
    seeds: list[int | None] = [7 + i for i in range(len(batch))]
    seeds[position] = 42
    assert run(batch, position, seeds) == alone
    assert run([target], 0, [43]) != alone, "a different seed should give a different sequence"


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = _logits(4, seed=3).to(torch.bfloat16)
    params = [
        GREEDY,
        SamplingParams(repetition_penalty=3.0),
        SamplingParams(temperature=0.3, top_k=2),
        SamplingParams(temperature=1.7, top_p=0.6, repetition_penalty=0.5),
    ]
    histories = [torch.arange(0, VOCAB, 2) for _ in params]
    sampled = _sample(logits, params, seeds=[0, 1, 2, 3], histories=histories)
    tokens, logprobs = sampled.tokens, sampled.logprobs
    expected = logits.float().log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_make_generator_seeding() -> None:
    def draws(generator: torch.Generator) -> list[float]:
        return torch.rand(4, generator=generator).tolist()

    assert draws(make_generator(5, "cpu")) == draws(make_generator(5, "cpu"))
    assert draws(make_generator(5, "cpu")) != draws(make_generator(6, "cpu"))
    assert draws(make_generator(None, "cpu")) != draws(make_generator(None, "cpu"))


# A batch where one row cannot be sampled: the others must come out exactly as they would alone.
INNOCENT = [
    GREEDY,
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.1, top_k=5, top_p=0.9, repetition_penalty=1.2),
]
HUGE = 3e38  # finite in float32, but not once divided by the smallest temperature
BAD_ROWS = {
    # name: (scores of the bad row, its parameters, its history, what must go wrong)
    "nan-greedy": ([0.0, float("nan")], GREEDY, [1], "unusable"),
    "nan-sampled": ([float("nan"), 1.0], SamplingParams(temperature=0.7), [1], "unusable"),
    "plus-infinity": ([float("inf"), 0.0], GREEDY, [1], "unusable"),
    "all-minus-infinity": (
        [float("-inf")] * VOCAB,
        SamplingParams(temperature=1.0),
        [1],
        "unusable",
    ),
    "temperature-overflow": ([HUGE, 0.0], SamplingParams(temperature=1e-3), [1], "unusable"),
    "penalty-overflow": ([HUGE, 0.0], SamplingParams(repetition_penalty=1e-2), [0], "unusable"),
    "penalty-raises": ([1.0, 0.0], SamplingParams(repetition_penalty=2.0), [VOCAB + 5], "error"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
@pytest.mark.parametrize("position", [0, 2])
def test_a_row_that_cannot_be_sampled_fails_alone(case: str, position: int) -> None:
    scores, params, history, failure = BAD_ROWS[case]
    bad_row = torch.full((VOCAB,), -5.0)
    bad_row[: len(scores)] = torch.tensor(scores)
    logits = _logits(len(INNOCENT), seed=9)
    seeds = [0, 11, 12]
    histories = [torch.tensor([1, 2, 3])] * len(INNOCENT)
    alone = _sample(logits, INNOCENT, seeds=seeds, histories=histories)

    batch = [*INNOCENT[:position], params, *INNOCENT[position:]]
    rows = torch.cat([logits[:position], bad_row[None], logits[position:]])
    with_bad = _sample(
        rows,
        batch,
        seeds=[*seeds[:position], 5, *seeds[position:]],
        histories=[*histories[:position], torch.tensor(history), *histories[position:]],
    )

    others = [i for i in range(len(batch)) if i != position]
    assert with_bad.tokens[others].tolist() == alone.tokens.tolist()
    torch.testing.assert_close(with_bad.logprobs[others], alone.logprobs)
    assert with_bad.usable[others].all()
    if failure == "error":
        assert set(with_bad.errors) == {position}
        assert isinstance(with_bad.errors[position], IndexError)
    else:
        assert not with_bad.errors and not with_bad.usable[position]


# ---- logit bias, constrained rows, top alternatives ----------------------------------------


def _allowed(rows: dict[int, list[int]], vocab: int = VOCAB) -> AllowedTokens:
    """Masks for `rows` (row -> the tokens it may choose), packed as the grammar compiler does."""
    words = (vocab + 31) // 32 + 1  # wider than the vocabulary, as a padded tokenizer's can be
    bitmask = torch.zeros((len(rows), words), dtype=torch.int64)
    for i, tokens in enumerate(rows.values()):
        for token in tokens:
            bitmask[i, token // 32] |= 1 << (token % 32)
    signed = torch.where(bitmask >= 1 << 31, bitmask - (1 << 32), bitmask).to(torch.int32)
    return AllowedTokens(torch.tensor(list(rows)), signed)


def test_unpack_bitmask_reads_every_bit_including_the_sign_bit() -> None:
    tokens = [0, 1, 30, 31, 32, 62, 63, VOCAB + 3]  # the last is past the vocabulary
    unpacked = unpack_bitmask(_allowed({0: tokens}).bitmask, VOCAB)
    assert unpacked.shape == (1, VOCAB)
    assert unpacked[0].nonzero().flatten().tolist() == tokens[:-1]


def test_logit_bias_shifts_exactly_the_named_tokens() -> None:
    logits = _logits(3, seed=4)
    params = [
        SamplingParams(logit_bias=(TokenBias(5, 2.5), TokenBias(63, -100.0))),
        GREEDY,
        SamplingParams(logit_bias=(TokenBias(0, 0.125),)),
    ]
    scores = logits.clone()
    apply_logit_bias(scores, params)
    shift = scores - logits
    expected = torch.zeros_like(logits)
    expected[0, 5], expected[0, 63], expected[2, 0] = 2.5, -100.0, 0.125
    torch.testing.assert_close(shift, expected, rtol=0, atol=1e-5)
    assert torch.equal(scores[1], logits[1])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logit_bias_steers_the_choice_and_the_logprobs_stay_raw(temperature: float) -> None:
    logits = _logits(2, seed=5)
    runner_up = logits[0].topk(2).indices[1].item()
    top = logits[1].argmax().item()
    biased = SamplingParams(temperature=temperature, logit_bias=(TokenBias(runner_up, 100.0),))
    banned = SamplingParams(logit_bias=(TokenBias(top, -100.0),))
    sampled = _sample(logits, [biased, banned], seeds=[3, 4])
    assert sampled.tokens[0] == runner_up
    assert sampled.tokens[1] == logits[1].topk(2).indices[1]
    raw = logits.log_softmax(dim=-1).gather(1, sampled.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(sampled.logprobs, raw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_rows_choose_only_allowed_tokens(temperature: float) -> None:
    logits = _logits(3, seed=6)
    choices = {0: [3, 40, 63], 2: [33]}
    params = [SamplingParams(temperature=temperature)] * 3
    for seed in range(20):
        sampled = _sample(logits, params, seeds=[seed] * 3, allowed=_allowed(choices))
        assert sampled.tokens[0].item() in choices[0] and sampled.tokens[2].item() == 33
        assert not sampled.errors and sampled.usable.all()
    greedy = _sample(logits, [GREEDY] * 3, allowed=_allowed(choices))
    best = max(choices[0], key=lambda t: logits[0, t].item())
    assert greedy.tokens[0] == best
    raw = logits.log_softmax(dim=-1).gather(1, greedy.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(greedy.logprobs, raw)


@pytest.mark.parametrize("position", [0, 1, 3])
def test_unconstrained_rows_come_out_as_without_constrained_neighbours(position: int) -> None:
    params = [
        GREEDY,
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=1.2, top_k=7, top_p=0.8, repetition_penalty=1.3),
        SamplingParams(temperature=0.6, logit_bias=(TokenBias(2, 3.0),)),
    ]
    seeds: list[int | None] = [0, 21, 22, 23]
    logits = _logits(4, seed=7)
    histories = [torch.tensor([1, 2, 3])] * 4
    plain = _sample(logits, params, seeds=seeds, histories=histories)
    constrained = {position: [9, 10], (position + 2) % 4: [11]}
    masked = _sample(logits, params, seeds, histories, _allowed(constrained))
    free = [row for row in range(4) if row not in constrained]
    assert masked.tokens[free].tolist() == plain.tokens[free].tolist()
    assert masked.tokens[position].item() in (9, 10)


def test_a_row_with_no_allowed_token_fails_alone() -> None:
    logits = _logits(2, seed=8)
    params = [GREEDY, GREEDY]
    sampled = _sample(logits, params, allowed=_allowed({1: []}))
    assert set(sampled.errors) == {1} and isinstance(sampled.errors[1], InvalidRequestError)
    assert sampled.tokens[0] == logits[0].argmax()


def test_top_logprobs_are_the_most_likely_raw_tokens_for_the_rows_that_ask() -> None:
    logits = _logits(3, seed=9).to(torch.bfloat16)
    params = [
        SamplingParams(top_logprobs=5, logit_bias=(TokenBias(0, 50.0),)),
        GREEDY,
        SamplingParams(top_logprobs=2, temperature=0.5, repetition_penalty=2.0),
    ]
    sampled = _sample(logits, params, seeds=[0, 0, 1], allowed=_allowed({0: [1]}))
    assert sampled.top is not None and sampled.top.rows == [0, 2]
    reference = logits.float().log_softmax(dim=-1)
    for k, (row, n) in enumerate([(0, 5), (2, 2)]):
        want, want_ids = reference[row].topk(n)
        assert sampled.top.ids[k, :n].tolist() == want_ids.tolist()
        torch.testing.assert_close(sampled.top.logprobs[k, :n], want)
    assert _sample(logits, [GREEDY] * 3).top is None
