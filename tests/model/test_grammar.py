"""The grammar compiler against the tiny models' byte-level BPE: every kind of constraint
compiles, a walk through random allowed tokens always ends in an output that matches, eos is
allowed exactly where the constraint may end (and can be blocked), tokens past the tokenizer's
vocabulary are never allowed, and hostile or broken constraints are refused with a message."""

from __future__ import annotations

import contextlib
import json
import random
import re
import time

import jsonschema
import pytest
import torch

from loraserve.model.grammar import GrammarCompiler, GrammarState
from loraserve.model.sampling import unpack_bitmask
from loraserve.model.tiny import build_tokenizer
from loraserve.types import Constraint, ConstraintKind, InvalidRequestError

VOCAB = 520  # the model's logits are wider than the tokenizer's 512 tokens
TOKENIZER = build_tokenizer(512)
EOS = TOKENIZER.eos_token_id
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
GBNF = 'root ::= "(" num ("+" num)? ")"\nnum ::= [0-9] [0-9]? [0-9]?\n'
LARK = 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,3}/\n'
ARITHMETIC = re.compile(r"\(\d{1,3}(\+\d{1,3})?\)")
CHOICES = ("yes", "no", 'say "maybe"', "Straße 🙂")
# 2500 chained GBNF rules: llguidance's Python converter would take seconds over them.
CHAIN = "root ::= r0\n" + "".join(f'r{i} ::= "x" r{i + 1} | "y"\n' for i in range(2500))


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(TOKENIZER, VOCAB, [EOS])


def allowed_tokens(compiler: GrammarCompiler, state: GrammarState, block_eos=False) -> list[int]:
    bitmask = torch.zeros((1, compiler.words), dtype=torch.int32)
    compiler.fill([state], bitmask, [block_eos])
    return unpack_bitmask(bitmask, VOCAB)[0].nonzero().flatten().tolist()


def walk(compiler: GrammarCompiler, constraint: Constraint, seed: int, limit: int = 300) -> str:
    """Random allowed tokens until eos or the grammar is complete; the decoded output."""
    state = compiler.compile(constraint).start()
    rng = random.Random(seed)
    tokens: list[int] = []
    for _ in range(limit):
        allowed = allowed_tokens(compiler, state)
        assert allowed and max(allowed) < len(TOKENIZER), "a token outside the tokenizer"
        token = rng.choice(allowed)
        if token == EOS:
            break
        assert state.accept(token)
        tokens.append(token)
        if state.done:
            assert allowed_tokens(compiler, state) == [EOS]
            break
    else:
        raise AssertionError(f"no end after {limit} tokens")
    return TOKENIZER.decode(tokens)


@pytest.mark.parametrize("seed", range(8))
def test_walks_through_allowed_tokens_always_match(compiler, seed):
    schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    jsonschema.validate(json.loads(walk(compiler, schema, seed)), SCHEMA)
    assert re.fullmatch(REGEX, walk(compiler, Constraint(ConstraintKind.REGEX, REGEX), seed))
    for grammar in (GBNF, LARK):
        text = walk(compiler, Constraint(ConstraintKind.GRAMMAR, grammar), seed)
        assert ARITHMETIC.fullmatch(text), text
    choice = Constraint(ConstraintKind.CHOICE, choices=CHOICES)
    assert walk(compiler, choice, seed) in CHOICES


def test_json_is_compact_and_eos_comes_only_where_it_may_end(compiler):
    state = compiler.compile(Constraint(ConstraintKind.JSON_SCHEMA, '{"type":"integer"}')).start()
    first = allowed_tokens(compiler, state)
    assert EOS not in first and TOKENIZER.encode(" ")[0] not in first  # no whitespace
    assert state.accept(TOKENIZER.convert_tokens_to_ids("4"))
    assert EOS in allowed_tokens(compiler, state)  # "4" is a whole integer: it may end here
    assert EOS not in allowed_tokens(compiler, state, block_eos=True)
    assert not state.done


def test_copies_of_one_grammar_advance_independently(compiler):
    grammar = compiler.compile(Constraint(ConstraintKind.CHOICE, choices=("yes", "no")))
    first, second = grammar.start(), grammar.start()
    bitmask = torch.zeros((2, compiler.words), dtype=torch.int32)
    assert first.accept(TOKENIZER.convert_tokens_to_ids("y"))
    compiler.fill([first, second], bitmask, [False, False])
    after_y, at_start = unpack_bitmask(bitmask, VOCAB)
    assert at_start.sum() > after_y.sum() and not torch.equal(after_y, at_start)
    assert TOKENIZER.convert_tokens_to_ids("n") in at_start.nonzero().flatten().tolist()


@pytest.mark.parametrize(
    ("kind", "text", "words"),
    [
        (ConstraintKind.JSON_SCHEMA, "{", "not a JSON schema"),
        (ConstraintKind.JSON_SCHEMA, "[1, 2]", "not a JSON schema"),
        (ConstraintKind.JSON_SCHEMA, '{"type": "nope"}', "nope"),
        (ConstraintKind.JSON_SCHEMA, '{"type": "array", "items": ' * 300 + "{}" + "}" * 300, ""),
        (
            ConstraintKind.JSON_SCHEMA,
            json.dumps({"allOf": [{"pattern": "^.*a.{20}$"}, {"pattern": "^.*b.{20}$"}]}),
            "",
        ),
        (ConstraintKind.REGEX, "(", "unclosed group"),
        (ConstraintKind.REGEX, "", "only the empty output"),
        (ConstraintKind.GRAMMAR, "root ::= foo", "'foo' not found"),
        (ConstraintKind.GRAMMAR, "root ::= (", "Expected ')'"),
        (ConstraintKind.GRAMMAR, "root ::= " + "(" * 3000 + '"a"' + ")" * 3000, "recursion"),
        (ConstraintKind.GRAMMAR, CHAIN, "send it in Lark syntax"),
    ],
)
def test_broken_or_hostile_constraints_are_refused_with_a_short_message(
    compiler, kind, text, words
):
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError) as refused:
        compiler.compile(Constraint(kind, text))
    assert time.perf_counter() - started < 1.0
    message = str(refused.value)
    assert message.startswith(f"the {kind.value} constraint is refused: ")
    assert words in message and len(message) < 400 and "\n" not in message


def test_a_tokenizer_without_eos_cannot_follow_constraints():
    tokenizer = build_tokenizer(512)
    compiler = GrammarCompiler(tokenizer, VOCAB, [])
    with pytest.raises(InvalidRequestError, match="end-of-sequence"):
        compiler.compile(Constraint(ConstraintKind.REGEX, "a"))


@pytest.mark.parametrize(
    "text",
    [
        "\n" * 60_000 + 'root ::= "a"',  # llguidance's own Lark test is quadratic on blank lines
        'root ::= "a"\n' + " \n" * 8000,
        "root ::= " + '("a")' * 3000,  # 15,000 characters: within the GBNF bounds
    ],
)
def test_large_grammar_texts_cost_little(compiler, text):
    started = time.perf_counter()
    with contextlib.suppress(InvalidRequestError):
        compiler.compile(Constraint(ConstraintKind.GRAMMAR, text))
    assert time.perf_counter() - started < 1.0


def test_lark_is_told_from_gbnf_as_llguidance_does(compiler):
    lark = Constraint(ConstraintKind.GRAMMAR, '\n  start :  "a" | "b"\n')
    tagged = Constraint(ConstraintKind.GRAMMAR, '%llguidance {}\nstart: "c"\n')
    assert walk(compiler, lark, 0) in ("a", "b")
    assert walk(compiler, tagged, 0) == "c"
    with pytest.raises(InvalidRequestError, match="GBNF"):  # "started" is not "start:"
        compiler.compile(Constraint(ConstraintKind.GRAMMAR, 'started: "a"'))
