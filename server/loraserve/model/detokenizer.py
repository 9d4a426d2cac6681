"""Incremental detokenization of one request's generated tokens, with stop sequences.

Owns turning a stream of token ids into text deltas that are safe to show: never half of a
multi-byte character and never any part of a stop sequence. Knows nothing about sampling,
batching or why a request ends; the caller pushes tokens and flushes when it finishes.

Each token decodes only a short window of recent ids, so the cost per token does not grow with
the sequence. The window's ids before `read_offset` were already turned into text and serve as
context, so that tokenizers which treat a sequence's first token differently (leading spaces,
byte fallback) decode the new ids as they would mid-sequence; the ids from `read_offset` on
become text once their decoding no longer ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded as context before the first generated one.
_PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one request; push each generated token, then flush if no stop was hit."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        # The window: ids[:read_offset] are context already turned into text (prefix_text),
        # ids[read_offset:] are not yet. It starts with the prompt's last tokens as context.
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._pending = ""  # decoded but held back: it may begin a stop sequence
        self._text = ""
        self._stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; return the text now safe to emit and whether a stop hit.

        On a hit the delta ends just before the stop sequence, which is never emitted.
        """
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        window_text = self._decode(self._ids)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_INCOMPLETE):
            return "", False
        new_text = window_text[len(self._prefix_text) :]
        self._advance()
        return self._release(new_text, final=False)

    def flush(self) -> str:
        """Return all text still held back, for a request that ends without a stop sequence.

        This includes an incomplete trailing character, decoded as the tokenizer does.
        """
        if self._stopped:
            return ""
        new_text = self._decode(self._ids)[len(self._prefix_text) :]
        self._advance()
        delta, _ = self._release(new_text, final=True)
        return delta

    def _advance(self) -> None:
        """Mark every id in the window as turned into text; they become the next context."""
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _release(self, new_text: str, final: bool) -> tuple[str, bool]:
        """Emit pending + new text up to a stop sequence, holding back a possible stop prefix."""
        pending = self._pending + new_text
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._stopped = True
            delta, self._pending = pending[: min(hits)], ""
        else:
            keep = 0 if final else _stop_prefix_length(pending, self._stop)
            delta, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._text += delta
        return delta, self._stopped

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True)  # str for a list of ids
        return text if isinstance(text, str) else "".join(text)


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The text of one token alone (U+FFFD for part of a multi-byte character)."""
    text = tokenizer.decode([token_id])
    return text if isinstance(text, str) else "".join(text)


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is the beginning of some stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(text), len(stop) - 1), longest, -1):
            if stop.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest
