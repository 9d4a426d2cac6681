"""Status codes to typed exceptions, the retry hint, the backoff's bounds and the translation of
arguments into request messages."""

from __future__ import annotations

import json

import grpc
import pytest

import loraserve_client
from loraserve_client import GenerateOptions
from loraserve_client.calls import Backoff, service_config
from loraserve_client.errors import LoraServeError, error_from_rpc, retry_after_seconds
from loraserve_client.messages import generation_input


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        (grpc.StatusCode.NOT_FOUND, "NotFound"),
        (grpc.StatusCode.FAILED_PRECONDITION, "FailedPrecondition"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "ResourceExhausted"),
        (grpc.StatusCode.UNAVAILABLE, "Unavailable"),
        (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"),
        (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceeded"),
        (grpc.StatusCode.CANCELLED, "Cancelled"),
        (grpc.StatusCode.INTERNAL, "Internal"),
        (grpc.StatusCode.UNIMPLEMENTED, "LoraServeError"),
        (grpc.StatusCode.ALREADY_EXISTS, "LoraServeError"),
    ],
)
def test_each_status_maps_to_its_exception(code, cls):
    error = error_from_rpc(FakeRpcError(code, "why"))
    assert type(error) is getattr(loraserve_client, cls)
    assert isinstance(error, LoraServeError)
    assert (error.code, error.details) == (code, "why")
    assert str(error) == f"{code.name}: why"


@pytest.mark.parametrize(
    ("trailing", "seconds"),
    [
        ((("retry-after-ms", "1500"),), 1.5),
        ((("other", "x"), ("retry-after-ms", b"20")), 0.02),
        ((("retry-after-ms", "soon"),), None),
        ((("grpc-retry-pushback-ms", "700"), ("retry-after-ms", "1000")), 0.7),
        ((), None),
        (None, None),
    ],
)
def test_retry_after_comes_from_the_trailer(trailing, seconds):
    assert retry_after_seconds(trailing) == seconds
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailing))
    assert error.retry_after == seconds


def test_the_service_config_retries_only_idempotent_methods_on_unavailable():
    config = json.loads(service_config(3, Backoff(initial=0.1, maximum=1.0, multiplier=2.0)))
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert ("loraserve.v1.GenerationService", "Generate") not in names
    assert ("loraserve.v1.AdapterService", "DeleteAdapter") not in names
    assert ("grpc.health.v1.Health", "Check") in names
    assert method_config["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.100s",
        "maxBackoff": "1.000s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert (
        json.loads(service_config(9, Backoff()))["methodConfig"][0]["retryPolicy"]["maxAttempts"]
        == 5
    )  # gRPC's cap
    assert json.loads(service_config(0, Backoff())) == {}


def test_generation_input_sets_only_what_is_given():
    unset = generation_input("hi", GenerateOptions())
    assert unset.WhichOneof("prompt") == "text" and unset.text == "hi"
    assert not unset.sampling.HasField("top_p")
    assert not unset.sampling.HasField("repetition_penalty")
    assert not unset.sampling.HasField("seed")
    assert unset.adapter.name == "" and list(unset.stop) == []
    assert not unset.logprobs and not unset.ignore_eos

    options = GenerateOptions("a", "2", 9, 0.7, 40, 0.9, 1.1, 0, "\n", True, True)
    full = generation_input([5, 6], options)
    assert full.WhichOneof("prompt") == "token_ids" and list(full.token_ids.ids) == [5, 6]
    assert (full.adapter.name, full.adapter.version, full.max_new_tokens) == ("a", "2", 9)
    assert full.sampling.HasField("seed") and full.sampling.seed == 0
    assert full.sampling.top_p == pytest.approx(0.9) and full.sampling.top_k == 40
    assert list(full.stop) == ["\n"] and full.logprobs and full.ignore_eos


def test_keyword_options_override_the_dataclass_and_unknown_ones_are_refused():
    base = GenerateOptions(adapter="a", max_new_tokens=5)
    merged = GenerateOptions.merged(base, {"max_new_tokens": 7, "ignore_eos": True})
    assert merged == GenerateOptions(adapter="a", max_new_tokens=7, ignore_eos=True)
    assert GenerateOptions.merged(None, {}) == GenerateOptions()
    with pytest.raises(TypeError, match="max_tokens"):
        GenerateOptions.merged(base, {"max_tokens": 7})
