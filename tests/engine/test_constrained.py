"""Constrained decoding in the continuous batch: every row may carry its own JSON schema,
regular expression, grammar or choice list, or none, next to other adapters, greedy or sampled.

The tiny models have random weights, so the schemas here have finite languages (bounded strings,
arrays and integers, no extra properties) and each request gets more new tokens than its longest
output: a constrained request then ends by its grammar, whatever the weights, and its output
must parse. The two schemas with unbounded numbers may be cut by max_new_tokens instead; what
ends with EOS must validate all the same."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest
from tests.engine.helpers import Collected, make_core, run
from tests.engine.test_parity import DEVICES

from loraserve.types import (
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
    TokenBias,
)

ADAPTERS = ("r1-qv", "r8-all", "r16-mlp", "r64-all")
PROMPTS = (
    "LoRA adapts a frozen base model",
    "The quick brown fox",
    "def forward(self, x):",
    "Café, naïve 🙂",
)
EOS = 2  # the tiny tokenizer's "</s>"
CONSTRAINED_MAX_NEW = 200  # above the longest output of every finite schema below, in bytes
FREE_MAX_NEW = 24

WORD = {"type": "string", "maxLength": 6}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": WORD,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                    "role": {"enum": ["admin", "user", "guest"]},
                },
                "required": ["id", "role"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "points": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "y": {"enum": [True, False, None]},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "colour": {"enum": ["red", "green", "blue", 1, None]},
    "code": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "deep": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": ["x", "y"]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99},
            "note": {"type": "string", "maxLength": 4},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "either": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, WORD]},
    "event": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "ok": {"type": "boolean"}},
        "required": ["kind", "ok"],
        "additionalProperties": False,
    },
    "pair": {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 3}, {"enum": ["a", "b"]}],
        "items": False,
    },
    # Unbounded numbers: the only schemas here whose language is infinite.
    "score": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "range": {"type": "array", "items": {"type": "number", "minimum": -10, "maximum": 10}},
}
UNBOUNDED = {"score", "range"}


@pytest.fixture(scope="module")
def core(model_dirs, adapter_dirs):
    core = make_core(model_dirs["llama"], "nf4", max_batch_size=16)
    for name in ADAPTERS:
        core.adapters.load(name, adapter_dirs["llama"][name])
    yield core
    assert core.kv_used_tokens == 0 and core.num_running == 0


def schema_of(request: GenerateRequest) -> dict | None:
    constraint = request.sampling.constraint
    return None if constraint is None else json.loads(constraint.text)


def mixed_batch() -> list[GenerateRequest]:
    """16 requests over 4 adapters: 12 schemas and 4 unconstrained, greedy and sampled."""
    names = iter(SCHEMAS)
    requests = []
    for i in range(16):
        sampling = SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, seed=i)
        if i % 4 == 3:
            sampling = replace(sampling, max_new_tokens=FREE_MAX_NEW, ignore_eos=True)
        else:
            schema = json.dumps(SCHEMAS[next(names)])
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, schema)
            sampling = replace(
                sampling,
                max_new_tokens=CONSTRAINED_MAX_NEW,
                constraint=constraint,
                ignore_eos=i % 3 == 0,  # eos blocked until the grammar is complete
            )
        requests.append(
            GenerateRequest(prompt=PROMPTS[i % 4], adapter=ADAPTERS[i // 4], sampling=sampling)
        )
    return requests


@pytest.mark.slow
def test_a_mixed_batch_of_schemas_adapters_and_unconstrained_rows(core):
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    requests = mixed_batch()
    results = run(core, {0: requests[:8], 2: requests[8:]})

    validated = 0
    for request, got in zip(requests, results):
        assert got.error is None, got.error
        schema = schema_of(request)
        if schema is None:
            continue
        name = next(k for k, v in SCHEMAS.items() if v == schema)
        if name not in UNBOUNDED:
            assert got.final.finish_reason is FinishReason.EOS, (name, got.text)
        if got.final.finish_reason is FinishReason.EOS:
            jsonschema.validate(json.loads(got.text), schema)
            validated += 1
        else:
            assert got.final.finish_reason is FinishReason.LENGTH
            assert len(got.tokens) == CONSTRAINED_MAX_NEW
    assert validated >= len(SCHEMAS) - len(UNBOUNDED)

    free = [i for i, r in enumerate(requests) if r.sampling.constraint is None]
    alone = run(core, {0: [requests[i] for i in free]})
    assert [results[i].tokens for i in free] == [a.tokens for a in alone]
    unconstrained = [replace(r, sampling=replace(r.sampling, constraint=None)) for r in requests]
    plain = run(core, {0: unconstrained[:8], 2: unconstrained[8:]})
    assert [results[i].tokens for i in free] == [plain[i].tokens for i in free]


GBNF = 'root ::= "(" num ("+" num)? ")"\nnum ::= [0-9] [0-9]? [0-9]?\n'
LARK = 'start: item ("," item){0,2}\nitem: "x=" /[0-9]/ | "flag"\n'
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
CHOICES = ("yes", "no", "maybe later")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_grammars_and_choices_in_one_batch(core, temperature):
    constraints = [
        Constraint(ConstraintKind.REGEX, REGEX),
        Constraint(ConstraintKind.GRAMMAR, GBNF),
        Constraint(ConstraintKind.GRAMMAR, LARK),
        Constraint(ConstraintKind.CHOICE, choices=CHOICES),
    ]
    requests = [
        GenerateRequest(
            prompt=PROMPTS[i],
            adapter=ADAPTERS[i],
            sampling=SamplingParams(
                max_new_tokens=64, temperature=temperature, seed=i, constraint=constraint
            ),
        )
        for i, constraint in enumerate(constraints)
    ]
    results = run(core, {0: requests})
    texts = [got.text for got in results]
    for got in results:
        assert got.error is None and got.final.finish_reason is FinishReason.EOS, got
    assert re.fullmatch(REGEX, texts[0])
    assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3})?\)", texts[1])
    assert re.fullmatch(r"(x=\d|flag)(,(x=\d|flag)){0,2}", texts[2])
    assert texts[3] in CHOICES


def digits(max_new: int, **sampling) -> GenerateRequest:
    """Digits only, an unbounded language; eos pushed up by +100, so the model wants to end."""
    return GenerateRequest(
        prompt=PROMPTS[1],
        sampling=SamplingParams(
            max_new_tokens=max_new,
            constraint=Constraint(ConstraintKind.REGEX, "[0-9]+"),
            logit_bias=(TokenBias(EOS, 100.0),),
            **sampling,
        ),
    )


def test_eos_comes_where_the_grammar_may_end_and_ignore_eos_holds_it_back(core):
    assert core.eos_ids == {EOS}
    wants_to_end, held = run(core, {0: [digits(10), digits(10, ignore_eos=True)]})
    assert wants_to_end.final.finish_reason is FinishReason.EOS
    assert len(wants_to_end.tokens) == 2 and wants_to_end.tokens[-1] == EOS
    assert re.fullmatch("[0-9]+", wants_to_end.text)  # never empty: eos waits for a digit
    assert held.final.finish_reason is FinishReason.LENGTH and len(held.tokens) == 10
    assert EOS not in held.tokens and re.fullmatch("[0-9]+", held.text)


def test_logit_bias_cannot_push_a_row_out_of_its_grammar(core):
    banned = core.tokenizer.convert_tokens_to_ids("!")
    request = GenerateRequest(
        prompt=PROMPTS[0],
        sampling=SamplingParams(
            max_new_tokens=20,
            constraint=Constraint(ConstraintKind.CHOICE, choices=("ok", "no")),
            logit_bias=(TokenBias(banned, 100.0),),
        ),
    )
    [got] = run(core, {0: [request]})
    assert got.final.finish_reason is FinishReason.EOS and got.text in ("ok", "no")


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        (
            SamplingParams(stop=("}",), constraint=Constraint(ConstraintKind.REGEX, "a")),
            "cannot be combined",
        ),
        (SamplingParams(constraint=Constraint(ConstraintKind.REGEX, "(")), "unclosed group"),
        (SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA, "")), "is empty"),
        (SamplingParams(constraint=Constraint(ConstraintKind.CHOICE)), "1 to 1024 strings"),
        (SamplingParams(top_logprobs=21), "top_logprobs must be in [0, 20]"),
        (SamplingParams(logit_bias=(TokenBias(600, 1.0),)), "outside the vocabulary [0, 512)"),
        (SamplingParams(logit_bias=(TokenBias(1, 101.0),)), "in [-100.0, 100.0]"),
        (SamplingParams(logit_bias=(TokenBias(1, float("nan")),)), "finite"),
        (SamplingParams(logit_bias=(TokenBias(1, 1.0), TokenBias(1, 2.0))), "a token twice"),
        (
            SamplingParams(logit_bias=tuple(TokenBias(i, 1.0) for i in range(301))),
            "above the limit of 300",
        ),
        (
            SamplingParams(constraint=Constraint(ConstraintKind.REGEX, "a" * 70_000)),
            "above this server's limit of 65536",
        ),
    ],
)
def test_bad_constraints_and_logprob_options_are_refused_before_queueing(core, sampling, words):
    with pytest.raises(InvalidRequestError) as refused:
        core.make_sequence(GenerateRequest(prompt="hi", sampling=sampling), lambda event: None)
    assert words in str(refused.value)
    assert core.num_waiting == 0 and core.intake.queued == 0


def test_a_grammar_that_breaks_mid_generation_fails_its_request_alone(core):
    constraint = Constraint(ConstraintKind.REGEX, "[a-z]+")
    broken = GenerateRequest(
        prompt=PROMPTS[0], sampling=SamplingParams(max_new_tokens=8, constraint=constraint)
    )
    neighbour = GenerateRequest(
        prompt=PROMPTS[1],
        sampling=SamplingParams(max_new_tokens=8, ignore_eos=True, constraint=constraint),
    )
    [alone] = run(core, {0: [neighbour]})
    seq = core.make_sequence(broken, failed := Collected())
    digit = core.tokenizer.convert_tokens_to_ids("7")
    assert not seq.grammar.accept(digit)  # the matcher is now in its error state
    core.add(seq)
    core.add_request(neighbour, together := Collected())
    while core.has_work():
        core.step()
    assert isinstance(failed.error, InvalidRequestError) and failed.tokens == []
    message = str(failed.error)
    assert message.startswith("the constraint could not be followed past token 0: ")
    assert "\n" not in message
    assert together.tokens == alone.tokens and together.final.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("device", DEVICES)
def test_masks_reach_the_logits_on_each_device(device, model_dirs):
    core = make_core(model_dirs["llama"], "nf4", device=device)
    free = GenerateRequest(
        prompt=PROMPTS[2], sampling=SamplingParams(max_new_tokens=12, ignore_eos=True)
    )
    requests = [
        GenerateRequest(
            prompt=PROMPTS[0],
            sampling=SamplingParams(
                max_new_tokens=32, constraint=Constraint(ConstraintKind.REGEX, REGEX)
            ),
        ),
        free,
        GenerateRequest(
            prompt=PROMPTS[1],
            sampling=SamplingParams(
                max_new_tokens=32,
                temperature=1.0,
                seed=3,
                constraint=Constraint(ConstraintKind.CHOICE, choices=CHOICES),
            ),
        ),
    ]
    matched, unconstrained, chosen = run(core, {0: requests})
    assert matched.final.finish_reason is FinishReason.EOS and re.fullmatch(REGEX, matched.text)
    assert chosen.final.finish_reason is FinishReason.EOS and chosen.text in CHOICES
    assert unconstrained.tokens == run(core, {0: [free]})[0].tokens
