"""Next-token selection for a batch of rows, each with its own sampling parameters.

Owns the repetition penalty, greedy choice, temperature, top-k / top-p filtering, the per-row
random draw and the log-probability reported for the chosen token. Knows nothing about
requests, adapters, the model or the tokenizer: it sees logits, parameters, one generator per
sampled row and each row's token history.

Every sampled row draws exactly once per call from its own generator, on its own row alone, so a
seeded request yields the same tokens whatever else shares its batch and in whatever order.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from loraserve.types import SamplingParams


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


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; return the tokens and their log-probabilities.

    The log-probability is that of the raw logits, before penalty, temperature or filtering.
    Greedy rows (temperature 0) take the argmax; the others draw from their own generator.
    """
    # logits: [B, V] any float dtype; histories[b]: [n_b] int64 on logits.device, or None
    # for a row whose repetition penalty is 1
    raw = logits.float()
    penalties = [p.repetition_penalty for p in params]
    scores = raw
    if any(penalty != 1.0 for penalty in penalties):
        scores = raw.clone()
        apply_repetition_penalty(scores, penalties, histories)

    tokens = scores.argmax(dim=-1)
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _draw(scores[row], p, generators[row])

    logprobs = raw.gather(1, tokens[:, None]).squeeze(1) - raw.logsumexp(dim=-1)
    # tokens: [B] int64, logprobs: [B] float32
    return tokens, logprobs


def _draw(
    scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """One multinomial draw from temperature-scaled, top-k then top-p filtered scores."""
    # scores: [V] float32 -> [1] int64 token id
    scores = scores / p.temperature
    if p.top_k == 0 and p.top_p >= 1.0:
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)

    ranked, order = scores.sort(descending=True, stable=True)
    if p.top_k > 0:
        ranked[p.top_k :] = float("-inf")
    if p.top_p < 1.0:
        probs = ranked.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        ranked = ranked.masked_fill(mass_before >= p.top_p, float("-inf"))
    return order[torch.multinomial(ranked.softmax(dim=-1), 1, generator=generator)]
