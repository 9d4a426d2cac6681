"""Drafted tokens for decode steps: prompt lookup, checked by the model in the same step.

A decode step feeds each row one token and gets one back, so a stream pays a whole step's host
work and weight reads per token; with few rows in the batch that is most of a step's cost
(benchmarks/RESULTS.md, one stream beside llama.cpp). Where the text being written repeats text
already in its context (a summary quoting its source, code edited in place, a form filled in,
JSON keys), the tokens that followed the last earlier occurrence of the context's final few
tokens are a good guess of what comes next. A row then feeds its pending token and those
guesses (its draft) in one step and gets logits at every position (`RowInput.scored`); the
engine keeps each drafted token while the greedy choice at the position before it agrees, and
the choice at the first disagreement, or after the last drafted token, is the row's next
pending token. The output is the tokens greedy decoding picks one step at a time: a drafted
token is kept only where it is that token (each position's logits are those of a one-token
step up to the rounding that separates batches of other sizes: in a 16-bit compute dtype a
near tie may fall the other way, as it may between batch sizes).

Only greedy rows without a repetition penalty or a constraint draft (their next token depends on
nothing but the logits at its position); sampled rows would draw from their generators in
another order, changing what a seed gives. Drafting stops when the batch holds more than
`max_rows` decode rows: a batch that already fills the CPU's arithmetic gains nothing from
checking guesses. A sequence whose draft kept nothing pauses drafting for a step, then for 2,
4, ... up to MAX_PAUSE_STEPS after each further miss, until a draft keeps a token: a drafter
that keeps guessing wrong for one sequence costs it a draft now and then, not every step.

`PromptLookup` finds the drafts: the longest of the context's last MAX_NGRAM .. MIN_NGRAM tokens
that occurred before, latest occurrence first, and the tokens after it (continued periodically
where they run into the end of the context: a loop repeats). It searches a bytes mirror of
each sequence's tokens with `bytearray.rfind`, in C: a step's search costs microseconds, and
at most one scan of the mirror per suffix length whatever the tokens, since each token's
bytes end with a marker byte that no token's digits hold (every match is of whole tokens).

Knows nothing about the model or the KV cache: sequences, token ids and counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from weakref import WeakKeyDictionary

from loraserve.engine.sequence import Sequence

MAX_NGRAM = 4  # the longest context suffix looked up
MIN_NGRAM = 2  # the shortest: a single token matches too often to be worth checking
TOKEN_BYTES = 4  # in the mirror, a token id is three base-255 digits and MARK
MARK = 0xFF  # ends every token's bytes and is no digit: a match cannot straddle tokens
DIGIT_BASE = 255
MAX_PAUSE_STEPS = 16  # the longest a sequence goes without drafting after drafts kept nothing


class Drafter(Protocol):
    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `seq.token_ids` (fewer, or none, where it has
        no guess)."""
        ...


class PromptLookup:
    """Drafts copied from earlier in the sequence's own tokens (prompt and output)."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # each sequence's tokens as int32 bytes, extended as it grows; gone with the sequence
        self._mirrors: WeakKeyDictionary[Sequence, bytearray] = WeakKeyDictionary()

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        tokens = seq.token_ids
        mirror = self._mirror(seq)
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            start = _after_earlier_occurrence(mirror, n, length)
            if start is not None:
                return _continued(tokens, start, limit)
        return []

    def _mirror(self, seq: Sequence) -> bytearray:
        mirror = self._mirrors.get(seq)
        if mirror is None:
            mirror = self._mirrors[seq] = bytearray()
        held = len(mirror) // TOKEN_BYTES
        for token in seq.token_ids[held:]:
            mirror += _token_bytes(token)
        return mirror


def _token_bytes(token: int) -> bytes:
    """Three base-255 digits and MARK. Ids past 255^3 - 1 (no vocabulary is that large) share
    the largest digits: a false match only drafts tokens the model then rejects."""
    token = min(token, DIGIT_BASE**3 - 1)
    return bytes((token % DIGIT_BASE, token // DIGIT_BASE % DIGIT_BASE, token // DIGIT_BASE**2,
                  MARK))  # fmt: skip


def _after_earlier_occurrence(mirror: bytearray, n: int, length: int) -> int | None:
    """The position after the latest occurrence of the last n tokens that ends before the last
    token, or None. mirror: `length` tokens as `_token_bytes`."""
    width = n * TOKEN_BYTES
    end = (length - 1) * TOKEN_BYTES  # occurrences lie wholly before the last token
    at = mirror.rfind(mirror[-width:], 0, end)
    return None if at < 0 else at // TOKEN_BYTES + n


def _continued(tokens: list[int], start: int, limit: int) -> list[int]:
    """tokens[start : start + limit], continued with its own first tokens where it runs past the
    end (start < len(tokens)): the text from `start` repeating with period len(tokens) - start."""
    period = len(tokens) - start
    return [tokens[start + i % period] for i in range(limit)]


@dataclass
class Backoff:
    """A sequence's pause after drafts that kept nothing: `pause` steps without drafting, then
    a draft again; each draft that keeps nothing doubles the pause (up to MAX_PAUSE_STEPS),
    one that keeps a token ends it."""

    pause: int = 0
    skip: int = 0  # steps left before the sequence drafts again


class Speculation:
    """Which decode rows draft this step and how many tokens: at most `max_tokens` a row, none
    while the batch holds more than `max_rows` decode rows, none for a sequence pausing after
    drafts that kept nothing (`Backoff`: where the drafter keeps guessing wrong, checking its
    guesses would cost every step)."""

    def __init__(self, drafter: Drafter, max_tokens: int, max_rows: int) -> None:
        self.drafter = drafter
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self._backoff: WeakKeyDictionary[Sequence, Backoff] = WeakKeyDictionary()

    def drafts(self, decode: list[Sequence], budget: int) -> dict[int, list[int]]:
        """request id -> its draft, for the rows of `decode` that draft; `budget`: how many
        tokens the step may feed beyond one a row."""
        if len(decode) > self.max_rows:
            return {}
        drafts = {}
        for seq in _drafting(decode):
            backoff = self._backoff.get(seq)
            if backoff is not None and backoff.skip > 0:
                backoff.skip -= 1
                continue
            # the last token a request may generate needs no KV: drafting past it is waste
            left = seq.params.max_new_tokens - seq.num_generated - 1
            limit = min(self.max_tokens, left, budget)
            if limit <= 0:
                continue
            draft = self.drafter.propose(seq, limit)[:limit]
            if draft:
                drafts[seq.request_id] = draft
                budget -= len(draft)
        return drafts

    def checked(self, seq: Sequence, kept: int) -> None:
        """`seq`'s draft this step kept `kept` tokens."""
        backoff = self._backoff.setdefault(seq, Backoff())
        if kept:
            backoff.pause = backoff.skip = 0
        else:
            backoff.pause = min(MAX_PAUSE_STEPS, 2 * backoff.pause or 1)
            backoff.skip = backoff.pause


def _drafting(decode: Iterable[Sequence]) -> Iterable[Sequence]:
    """The rows whose next token is the argmax of their logits alone."""
    for seq in decode:
        p = seq.params
        if p.greedy and p.repetition_penalty == 1.0 and seq.grammar is None:
            yield seq
