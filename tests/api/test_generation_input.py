"""The servicer's translation of GenerationInput's constraint, top_logprobs and logit_bias into
the domain request (no server: `to_domain` is a pure function)."""

from __future__ import annotations

import pytest

from loraserve.api.generation import to_domain
from loraserve.types import (
    MAX_LOGIT_BIAS_TOKENS,
    Constraint,
    ConstraintKind,
    InvalidRequestError,
    TokenBias,
)
from loraserve_client.v1 import generation_pb2 as pb


def translated(**fields) -> object:
    return to_domain(pb.GenerationInput(text="hi", **fields), "acme", 16).sampling


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (pb.Constraint(json_schema='{"type": "integer"}'),
         Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "integer"}')),
        (pb.Constraint(regex="[a-z]+"), Constraint(ConstraintKind.REGEX, "[a-z]+")),
        (pb.Constraint(grammar='root ::= "a"'), Constraint(ConstraintKind.GRAMMAR, 'root ::= "a"')),
        (pb.Constraint(choice=pb.Choices(values=["yes", "no"])),
         Constraint(ConstraintKind.CHOICE, choices=("yes", "no"))),
    ],
)  # fmt: skip
def test_each_kind_of_constraint_arrives_as_sent(constraint, expected):
    assert translated(constraint=constraint).constraint == expected


def test_no_constraint_top_logprobs_and_the_bias_in_token_order():
    sampling = translated(top_logprobs=5, logit_bias={9: -1.5, 3: 100.0})
    assert sampling.constraint is None
    assert sampling.top_logprobs == 5 and sampling.wants_logprobs
    assert sampling.logit_bias == (TokenBias(3, 100.0), TokenBias(9, -1.5))


def test_an_empty_constraint_names_the_fields_to_set():
    with pytest.raises(InvalidRequestError, match="set json_schema, regex, grammar or choice"):
        translated(constraint=pb.Constraint())


def test_too_many_biased_tokens_are_refused_before_they_are_read():
    bias = {i: 1.0 for i in range(MAX_LOGIT_BIAS_TOKENS + 1)}
    with pytest.raises(InvalidRequestError, match=f"above the limit of {MAX_LOGIT_BIAS_TOKENS}"):
        translated(logit_bias=bias)
