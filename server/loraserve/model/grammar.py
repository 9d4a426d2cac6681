"""Constrained decoding over llguidance: constraints compiled against the served tokenizer, one
matcher per constrained request, and next-token bitmasks for many matchers at once.

Owns turning a `Constraint` (JSON schema, regular expression, GBNF or Lark grammar, choice list)
into an llguidance grammar, compiling it under resource limits (a tenant's constraint is hostile
input: the parser's fuel, items and lexer states are capped, so no step of a matcher runs
unbounded), and filling a batch's bitmasks in parallel with the GIL released. JSON is compact
(no whitespace between tokens), so a schema with a finite language has finite outputs.

Knows nothing about requests, caching, threads or batching: the engine decides which rows are
constrained and when their masks are filled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loraserve.types import Constraint, ConstraintKind, InvalidRequestError, clip

log = logging.getLogger(__name__)

# llguidance's defaults bound each step's work (lexer fuel, Earley items); the lexer's states
# are built lazily and shared by the copies of one grammar, capped here at about 20 MB.
LIMITS = llguidance.LLParserLimits(max_lexer_states=10_000, verbose_errors=False)
# What a compiled grammar holds besides its text: the matcher and its first lexer states.
GRAMMAR_BASE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 300
# GBNF is converted to Lark in Python, holding the GIL, in time that grows with the characters
# and with rules x characters (each bound costs about 0.2 s at most); Lark is parsed natively.
GBNF_MAX_CHARS = 16 * 1024
GBNF_BUDGET = 1_000_000


class GrammarState:
    """One request's position in its grammar; advanced by each token it accepts."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by `token_id`; False if the grammar refuses it (the state is then broken)."""
        return self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar admits nothing more: the output is complete and parses."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher broke (a step over its limits), or None."""
        return _short(self.matcher.get_error()) if self.matcher.is_error() else None


class Grammar:
    """A compiled constraint: a matcher at the start state, copied for each request."""

    def __init__(self, template: llguidance.LLMatcher, size_bytes: int) -> None:
        self._template = template
        self.size_bytes = size_bytes

    def start(self) -> GrammarState:
        return GrammarState(self._template.deep_copy())


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar for `constraint` (not yet checked); InvalidRequestError when the
    grammar text itself does not parse."""
    kind = constraint.kind
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                constraint.text,
                overrides={
                    "whitespace_flexible": False,
                    "item_separator": ",",
                    "key_separator": ":",
                },
            )
        except (ValueError, RecursionError) as error:
            raise _refused(constraint, f"not a JSON schema: {error}") from None
    if kind is ConstraintKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(constraint.text)
    if kind is ConstraintKind.CHOICE:
        lark = "start: " + " | ".join(json.dumps(c) for c in constraint.choices)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if _is_lark(constraint.text):
        return llguidance.LLMatcher.grammar_from_lark(constraint.text)
    rules, chars = constraint.text.count("::="), len(constraint.text)
    if chars > GBNF_MAX_CHARS or rules * chars > GBNF_BUDGET:
        raise _refused(
            constraint,
            f"a GBNF grammar of {rules} rules in {chars} characters is too large to convert (at "
            f"most {GBNF_MAX_CHARS} characters, and rules x characters at most {GBNF_BUDGET}); "
            "send it in Lark syntax",
        )
    try:
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(constraint.text))
    except Exception as error:  # the converter raises bare Exceptions for unknown rules
        raise _refused(constraint, f"not a GBNF or Lark grammar: {error}") from None


def _is_lark(text: str) -> bool:
    """Whether a grammar is in Lark syntax: a line starting `%llguidance` or `start:`. This is
    llguidance's own test, line by line in linear time (its regex is quadratic on blank lines)."""
    for line in text.splitlines():
        stripped = line.lstrip()
        after = stripped[len("%llguidance") : len("%llguidance") + 1]
        if stripped.startswith("%llguidance") and not (after.isalnum() or after == "_"):
            return True
        if stripped.startswith("start") and stripped[len("start") :].lstrip().startswith(":"):
            return True
    return False


def _refused(constraint: Constraint, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"the {constraint.kind.value} constraint is refused: {_short(why)}")


def _short(why: str) -> str:
    """llguidance's message on one line, without its marker for hidden details, bounded."""
    return clip(" ".join(why.replace("<non-verbose/>", "").split()), MAX_ERROR_CHARS)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and fills bitmasks of `words` int32 per row.

    Bit `t % 32` of word `t // 32` set means token t may come next. `vocab_size` is the width of
    the model's logits; `eos_ids` the tokens that end a request where the grammar may end.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: Iterable[int]
    ) -> None:
        self.eos_ids = sorted(eos_ids)
        self.unsupported: str | None = None
        self._tokenizer: llguidance.LLTokenizer | None = None
        if not isinstance(tokenizer, PreTrainedTokenizerFast) or not self.eos_ids:
            self.unsupported = "constraints need a fast tokenizer with an end-of-sequence token"
        else:
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    tokenizer, n_vocab=max(vocab_size, len(tokenizer)), eos_token=self.eos_ids
                )
            except Exception as error:  # a tokenizer llguidance cannot read: serve without
                self.unsupported = f"llguidance cannot read this tokenizer ({_short(str(error))})"
        if self.unsupported:
            log.warning("constrained decoding is off: %s", self.unsupported)
        width = self._tokenizer.vocab_size if self._tokenizer else vocab_size
        self.words = (width + 31) // 32
        self._executor = llguidance.LLExecutor()
        words = [0xFFFFFFFF] * self.words
        for eos in self.eos_ids:
            words[eos // 32] &= ~(1 << (eos % 32))
        # [words] int32: every bit but the eos tokens' (the 32-bit patterns, read as signed)
        self._without_eos = torch.tensor(
            [w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32
        )

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar, with its first mask computed (which builds its first lexer
        states); InvalidRequestError naming what is wrong when it cannot be followed."""
        if self._tokenizer is None:
            raise InvalidRequestError(f"this server cannot follow constraints: {self.unsupported}")
        text = grammar_text(constraint)
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=LIMITS)
        first = torch.zeros((1, self.words), dtype=torch.int32)
        if not matcher.is_error():
            self.fill([GrammarState(matcher)], first, [True])
        if matcher.is_error():
            raise _refused(constraint, matcher.get_error())
        if not first.any():
            raise _refused(constraint, "it admits only the empty output")
        return Grammar(matcher, GRAMMAR_BASE_BYTES + len(text) + len(constraint.text))

    def fill(
        self, states: Sequence[GrammarState], bitmask: torch.Tensor, block_eos: Sequence[bool]
    ) -> None:
        """Write each state's next-token mask into its row of `bitmask`, in parallel threads
        without the GIL; rows whose `block_eos` is set lose their eos bits (`ignore_eos`)."""
        # bitmask: [>= len(states), words] int32, contiguous, on the CPU
        self._executor.unsafe_compute_mask_ptr(
            [(state.matcher, row) for row, state in enumerate(states)],
            bitmask.data_ptr(),
            self.words * 4,
            bitmask.shape[0],
        )
        blocked = [row for row, block in enumerate(block_eos) if block]
        if blocked:
            bitmask[blocked] &= self._without_eos
