"""The OpenAI bodies' translation to the domain request and the error mapping, without a server:
`model` to adapter and version, the fields the engine cannot honour refused by name, every
domain error at the HTTP status of its gRPC status, and the reply shapes the client parses."""

from __future__ import annotations

import json

import grpc
import pytest
from pydantic import ValidationError

from loraserve.api.errors import STATUS_OF
from loraserve.api.http.errors import HTTP_STATUS, HttpError
from loraserve.api.http.schemas import ChatBody, CompletionBody
from loraserve.api.http.translate import Reply, chat_request, completion_request
from loraserve.types import (
    CapacityError,
    ConstraintKind,
    FinalEvent,
    FinishReason,
    InvalidRequestError,
    QuotaExceededError,
    TokenEvent,
)

BASE = "base-model"


def completion(**fields) -> CompletionBody:
    return CompletionBody.model_validate({"model": "sql", "prompt": "hi", **fields})


def translated(**fields):
    return completion_request(completion(**fields), "alpha", BASE, 16)


def test_model_names_the_base_an_adapter_or_one_version():
    assert (translated(model=BASE).adapter, translated(model=BASE).adapter_version) == (None, None)
    assert (translated().adapter, translated().adapter_version) == ("sql", None)
    pinned = translated(model="sql@3")
    assert (pinned.adapter, pinned.adapter_version, pinned.tenant) == ("sql", "3", "alpha")
    with pytest.raises(InvalidRequestError, match="ends in '@'"):
        translated(model="sql@")


def test_sampling_fields_map_to_the_engines():
    request = translated(
        max_tokens=7, temperature=0, top_p=0.5, stop="END", seed=3, logprobs=2,
        logit_bias={"17": -100}, top_k=4, repetition_penalty=1.2, ignore_eos=True,
    )  # fmt: skip
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.stop, s.seed) == (7, 0, 0.5, ("END",), 3)
    assert (s.top_logprobs, s.logprobs, s.top_k, s.repetition_penalty) == (2, True, 4, 1.2)
    assert s.ignore_eos and [(b.token_id, b.bias) for b in s.logit_bias] == [(17, -100)]
    assert translated().sampling.temperature == 1.0  # OpenAI's default: sampled
    assert translated().sampling.max_new_tokens == 16  # the server's default
    assert translated(prompt=[5, 6]).prompt_token_ids == (5, 6)


def test_chat_messages_and_response_formats():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    schema = {"name": "x", "schema": {"type": "integer"}}
    body = ChatBody.model_validate(
        {
            "model": BASE,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": parts},
            ],
            "max_tokens": 9,
            "max_completion_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": schema},
        }
    )
    request = chat_request(body, "alpha", BASE, 16)
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "ab"),
    ]
    assert request.sampling.max_new_tokens == 5  # max_completion_tokens wins
    constraint = request.sampling.constraint
    assert constraint.kind is ConstraintKind.JSON_SCHEMA
    assert json.loads(constraint.text) == {"type": "integer"}
    as_object = ChatBody.model_validate(
        {**body.model_dump(by_alias=True), "response_format": {"type": "json_object"}}
    )
    any_object = chat_request(as_object, "t", BASE, 16)
    assert json.loads(any_object.sampling.constraint.text) == {"type": "object"}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n": 2}, "n must be 1"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"echo": True}, "echo, suffix and best_of"),
        ({"logit_bias": {"a": 1}}, "token ids written as strings"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "above the limit of 300"),
    ],
)
def test_what_the_engine_cannot_honour_is_refused_by_name(fields, match):
    with pytest.raises(InvalidRequestError, match=match):
        translated(**fields)


def test_unknown_fields_and_wrong_types_are_refused_naming_each_field():
    with pytest.raises(ValidationError) as caught:
        CompletionBody.model_validate_json(b'{"model": "m", "prompt": 5, "tools": []}')
    refusal = HttpError.invalid_body(caught.value)
    assert refusal.status == 400 and "prompt" in refusal.message and "tools" in refusal.message
    assert refusal.payload()["error"]["type"] == "invalid_request_error"


def test_every_domain_error_has_its_grpc_status_in_http():
    for error_type, code in STATUS_OF.items():
        assert code in HTTP_STATUS, error_type
        assert HttpError.of(error_type("x")).status == HTTP_STATUS[code]
    busy = HttpError.of(CapacityError("the queue is full"))
    assert (busy.status, busy.response().headers["retry-after"]) == (429, "1")
    assert "retry-after" not in HttpError.of(QuotaExceededError("full")).response().headers
    hidden = HttpError.of(RuntimeError("secret path /x"))
    assert hidden.status == 500 and "secret" not in hidden.message
    assert hidden.code is grpc.StatusCode.INTERNAL


def test_reply_shapes():
    final = FinalEvent(FinishReason.EOS, prompt_tokens=3, completion_tokens=2, text="ab")
    reply = Reply("sql", chat=True, token_ids=True)
    reply.tokens += [TokenEvent(5, "a"), TokenEvent(6, "b")]
    whole = reply.whole(final)
    assert whole["object"] == "chat.completion" and whole["model"] == "sql"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert (
        whole["choices"][0]["token_ids"] == [5, 6]
        and whole["choices"][0]["finish_reason"] == "stop"
    )
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunk = reply.chunk(TokenEvent(5, "a", logprob=-0.5))
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5
    text = Reply("sql", chat=False, token_ids=False).last_chunk(final)
    assert text["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "stop", "text": ""}
