"""Next-token selection for a batch of rows, each with its own sampling parameters.

Owns the repetition penalty, the logit bias, the allowed-token masks of constrained rows, greedy
choice, temperature, top-k / top-p filtering, the per-row random draw, and the log-probabilities
reported: the chosen token's and the most likely alternatives', both of the raw logits. Each
step applies, in order: penalty, bias, mask, then greedy choice or temperature and filtering.
Knows nothing about requests, adapters, grammars, the model or the tokenizer: it sees logits,
parameters, one generator per sampled row, each row's token history and a bitmask per
constrained row. Rows without a penalty, a bias, a mask or alternatives asked for cost no
per-row work for them.

Every sampled row draws exactly once per call from its own generator, on its own row alone, so a
seeded request yields the same tokens whatever else shares its batch and in whatever order.

One row's trouble stays in that row: a row whose scores are not usable (a NaN or +infinity, or
nothing but -infinity, before or after its temperature) is marked unusable instead of drawn
from, and an exception while penalising or drawing one row is returned for that row; the other
rows are sampled as if it were not there. Nothing here syncs with the device per row.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.model.kernels import native
from loraserve.types import InvalidRequestError, SamplingParams

NO_ALLOWED_TOKEN = (
    "the constraint leaves no token the model can produce next; loosen the constraint or the "
    "logit_bias"
)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded from `seed`, or from fresh OS randomness when None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def apply_repetition_penalty(
    scores: torch.Tensor, penalties: Sequence[float], histories: Sequence[torch.Tensor | None]
) -> None:
    """HF-style penalty, in place, on every row whose penalty is not 1.

    For each token id in the row's history: a positive score is divided by the penalty, any
    other is multiplied by it.
    """
    # scores: [B, V] float32; histories[b]: [n_b] int64 token ids of row b
    for row, penalty in enumerate(penalties):
        if penalty == 1.0:
            continue
        ids = histories[row]
        seen = scores[row, ids]
        scores[row, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def apply_logit_bias(scores: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's `logit_bias` to the named tokens' scores, in place; nothing else moves."""
    # scores: [B, V] float32
    rows, ids, values = [], [], []
    for row, p in enumerate(params):
        for bias in p.logit_bias:
            rows.append(row)
            ids.append(bias.token_id)
            values.append(bias.bias)
    if rows:
        device = scores.device
        scores.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
            torch.tensor(values, dtype=scores.dtype, device=device),
            accumulate=True,
        )


@dataclass(frozen=True)
class AllowedTokens:
    """The tokens each constrained row may choose: bit `t % 32` of word `t // 32` set means
    token t is allowed (words past the vocabulary are ignored)."""

    rows: torch.Tensor  # [C] int64: the rows of the batch these masks apply to
    bitmask: torch.Tensor  # [C, ceil(V' / 32)] int32, V' >= V, on the logits' device


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[C, W] int32 bitmask -> [C, vocab] bool, True where the token is allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]


@dataclass(frozen=True)
class TopLogprobs:
    """The most likely tokens of the rows that asked, most likely first: `rows[i]`'s are
    `ids[i, :n]` with `logprobs[i, :n]`, n being what that row asked for."""

    rows: list[int]
    ids: torch.Tensor  # [R, max n] int64
    logprobs: torch.Tensor  # [R, max n] float32, of the raw logits


@dataclass(frozen=True)
class Sampled:
    """One call's choices. A row is good when `usable[row]` and not in `errors`."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, of the raw logits
    usable: torch.Tensor  # [B] bool: the row's scores could be sampled from
    errors: dict[int, Exception]  # row -> what was raised while sampling it alone
    top: TopLogprobs | None = None  # when some row asked for alternatives


def usable_scores(scores: torch.Tensor) -> torch.Tensor:
    """[..., V] scores -> [...] bool: no NaN, no +infinity, and at least one finite score.

    -infinity alone is a token ruled out, not a fault. (A row's max is NaN if it holds a NaN,
    +infinity if it holds one, and -infinity if nothing else is left.)
    """
    return scores.amax(dim=-1).isfinite()


@dataclass(frozen=True)
class ScoreStats:
    """Per row of [B, V] scores, as torch's argmax, amax and logsumexp give them."""

    argmax: torch.Tensor  # [B] int64: the first index of the maximum (of the first NaN)
    max: torch.Tensor  # [B] float32
    logsumexp: torch.Tensor  # [B] float32


def score_stats(scores: torch.Tensor) -> ScoreStats:
    """scores: [B, V] float32. On CPUs one compiled call reads each row twice, where torch's
    three ops read it five times (about 2 ms of a 32 x 32,000 decode step)."""
    ops = native()
    if (
        ops is not None
        and scores.device.type == "cpu"
        and scores.dtype == torch.float32
        and scores.is_contiguous()
    ):
        return ScoreStats(*ops.score_stats(scores))
    return score_stats_reference(scores)


def score_stats_reference(scores: torch.Tensor) -> ScoreStats:
    """`score_stats` by torch: the compiled op's oracle, and its stand-in off the CPU."""
    return ScoreStats(scores.argmax(dim=-1), scores.amax(dim=-1), scores.logsumexp(dim=-1))


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[torch.Tensor | None],
    allowed: AllowedTokens | None = None,
) -> Sampled:
    """Pick one token per row, with its log-probability; see `Sampled` for rows that failed.

    Log-probabilities are those of the raw logits, before penalty, bias, mask, temperature or
    filtering. Greedy rows (temperature 0) take the argmax; the others draw from their own
    generator. A constrained row (in `allowed`) chooses among its allowed tokens only.
    """
    # logits: [B, V] any float dtype; histories[b]: [n_b] int64 on logits.device, or None
    # for a row whose repetition penalty is 1
    raw = logits.float()
    errors: dict[int, Exception] = {}
    scores = raw
    biased = any(p.logit_bias for p in params)
    if biased or allowed is not None or any(p.repetition_penalty != 1.0 for p in params):
        scores = raw.clone()
        for row, p in enumerate(params):
            try:
                apply_repetition_penalty(
                    scores[row : row + 1], [p.repetition_penalty], [histories[row]]
                )
            except Exception as error:  # this row fails alone
                errors[row] = error
    if biased:
        apply_logit_bias(scores, params)

    stats = score_stats(raw)
    usable = stats.max.isfinite() if scores is raw else usable_scores(scores)
    if allowed is not None:
        _mask(scores, allowed, errors)
    tokens = stats.argmax if scores is raw and allowed is None else scores.argmax(dim=-1)
    for row, p in enumerate(params):
        if p.greedy or row in errors:
            continue
        try:
            tokens[row], drawable = _draw(scores[row], p, generators[row])
        except Exception as error:  # this row fails alone
            errors[row] = error
            continue
        usable[row] &= drawable

    normaliser = stats.logsumexp.unsqueeze(1)  # [B, 1]
    logprobs = (raw.gather(1, tokens[:, None]) - normaliser).squeeze(1)
    return Sampled(tokens, logprobs, usable, errors, _top(raw, normaliser, params))


def _mask(scores: torch.Tensor, allowed: AllowedTokens, errors: dict[int, Exception]) -> None:
    """Rule out, in place, every token a constrained row may not choose; a row left with no
    finite score fails alone."""
    # scores: [B, V] float32
    keep = unpack_bitmask(allowed.bitmask, scores.shape[1])
    masked = scores[allowed.rows].masked_fill(~keep, float("-inf"))
    scores[allowed.rows] = masked
    for i in (~masked.amax(dim=-1).isfinite()).nonzero().flatten().tolist():
        errors.setdefault(int(allowed.rows[i]), InvalidRequestError(NO_ALLOWED_TOKEN))


def _top(
    raw: torch.Tensor, normaliser: torch.Tensor, params: Sequence[SamplingParams]
) -> TopLogprobs | None:
    """The most likely tokens of the rows with `top_logprobs` > 0, from the raw logits."""
    rows = [row for row, p in enumerate(params) if p.top_logprobs > 0]
    if not rows:
        return None
    n = min(max(params[row].top_logprobs for row in rows), raw.shape[1])
    index = torch.tensor(rows, device=raw.device)
    values, ids = raw[index].topk(n, dim=-1)
    return TopLogprobs(rows, ids, values - normaliser[index])


def _draw(
    scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multinomial draw from temperature-scaled, top-k then top-p filtered scores, and
    whether those scores were usable (if not, the draw is from a stand-in and means nothing)."""
    # scores: [V] float32 -> ([1] int64 token id, [] bool)
    scores = scores / p.temperature
    if p.top_k > 0 or p.top_p < 1.0:
        ranked, order = scores.sort(descending=True, stable=True)
        if p.top_k > 0:
            ranked[p.top_k :] = float("-inf")
        if p.top_p < 1.0:
            probs = ranked.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            ranked = ranked.masked_fill(mass_before >= p.top_p, float("-inf"))
    else:
        ranked, order = scores, None
    drawable = usable_scores(ranked)
    # torch.multinomial would raise (or assert on the device) on NaN: draw from token 0 instead
    probs = torch.where(drawable, ranked.softmax(dim=-1), _first_token(ranked))
    choice = torch.multinomial(probs, 1, generator=generator)
    return (choice if order is None else order[choice]), drawable


def _first_token(scores: torch.Tensor) -> torch.Tensor:
    """[V] -> [V] probabilities: all of the mass on token 0."""
    stand_in = torch.zeros_like(scores)
    stand_in[0] = 1.0
    return stand_in
