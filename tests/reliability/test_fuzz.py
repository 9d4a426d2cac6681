"""Promise: whatever a caller sends to any RPC, the answer is a documented status code (never
UNKNOWN or INTERNAL) with a short message, and the server's memory stays bounded. Hypothesis
draws well-formed messages with hostile values (NaN and infinite floats, huge integers,
non-identifier names, random page tokens, upload streams in any order) and raw bytes, under
every kind of key, for FUZZ_SECONDS or MIN_CALLS calls, whichever is more (the examples past
both are skipped)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.reliability.helpers import SHARED, metadata

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import server_pb2 as spb

pytestmark = pytest.mark.slow
FUZZ_SECONDS = 20.0
MAX_EXAMPLES = 3000  # more than the budget allows on the development machine
MIN_CALLS = 100  # made even past the budget, so a busy machine tests as much
MAX_RSS_GROWTH = 256 << 20
Code = grpc.StatusCode
DOCUMENTED = {
    Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.DEADLINE_EXCEEDED,
}  # fmt: skip
GENERATION = "/loraserve.v1.GenerationService/"
ADAPTERS = "/loraserve.v1.AdapterService/"


@dataclass(frozen=True)
class Probe:
    """One call: the method, its request (a message, raw bytes, or a list for a stream)."""

    method: str
    request: object
    key: str | None
    streams_reply: bool = False


# Each strategy mixes values that pass validation with hostile ones, so calls get through to
# generation, uploads and the tiers as well as being refused at the door.
keys = st.sampled_from(["fuzz-key", "beta-key", None, "no-such-key"])
names = st.one_of(
    st.sampled_from(["", SHARED]),
    st.text(max_size=70),
    st.sampled_from(["x", "../x", "a" * 65, "a..b"]),
)
uint32 = st.integers(0, 2**32 - 1)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
temperatures = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), floats)
fractions = st.one_of(st.sampled_from([0.5, 0.9, 1.0, 1.2]), floats)
tokens = st.one_of(st.integers(0, 16), st.sampled_from([4096, 4097, 2**31, 2**32 - 1]))


@st.composite
def generation_inputs(draw) -> gpb.GenerationInput:
    message = gpb.GenerationInput(
        adapter=gpb.AdapterRef(name=draw(names), version=draw(st.one_of(st.just(""), names))),
        max_new_tokens=draw(tokens),
        stop=draw(st.lists(st.text(max_size=8), max_size=3)),
        logprobs=draw(st.booleans()),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        message.text = draw(st.text(max_size=200))
    elif draw(st.booleans()):
        message.token_ids.ids.extend(draw(st.lists(uint32, max_size=20)))
    sampling = message.sampling
    sampling.temperature = draw(temperatures)
    sampling.top_k = draw(st.one_of(st.integers(0, 50), uint32))
    for field in ("top_p", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(sampling, field, draw(fractions))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    return message


@st.composite
def uploads(draw) -> list[apb.UploadAdapterRequest]:
    filenames = st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "x.bin", ""])
    files = st.builds(
        apb.AdapterFile, filename=filenames, sha256=st.text(max_size=70), size_bytes=uint32
    )
    header = apb.UploadHeader(
        name=draw(names), version=draw(names), files=draw(st.lists(files, max_size=3))
    )
    chunk = st.builds(apb.FileChunk, filename=filenames, data=st.binary(max_size=256))
    parts = [apb.UploadAdapterRequest(chunk=c) for c in draw(st.lists(chunk, max_size=4))]
    if draw(st.booleans()):
        parts.insert(0, apb.UploadAdapterRequest(header=header))
    return parts


def by_name(message: type, **extra) -> st.SearchStrategy:
    return st.builds(message, name=names, version=names, **extra)


def probe(method: str, requests: st.SearchStrategy, streams_reply: bool = False):
    return st.builds(Probe, st.just(method), requests, keys, st.just(streams_reply))


probes = st.one_of(
    probe(GENERATION + "Generate", st.builds(gpb.GenerateRequest, input=generation_inputs())),
    probe(
        GENERATION + "GenerateStream",
        st.builds(gpb.GenerateStreamRequest, input=generation_inputs()),
        streams_reply=True,
    ),
    probe(ADAPTERS + "UploadAdapter", uploads()),
    probe(
        ADAPTERS + "ListAdapters",
        st.builds(apb.ListAdaptersRequest, page_size=uint32, page_token=st.text(max_size=600)),
    ),
    probe(ADAPTERS + "GetAdapter", by_name(apb.GetAdapterRequest)),
    probe(ADAPTERS + "DeleteAdapter", by_name(apb.DeleteAdapterRequest)),
    probe(ADAPTERS + "PrefetchAdapter", by_name(apb.PrefetchAdapterRequest)),
    probe(ADAPTERS + "PinAdapter", by_name(apb.PinAdapterRequest, pinned=st.booleans())),
    probe("/loraserve.v1.ServerService/GetServerInfo", st.just(spb.GetServerInfoRequest())),
    probe("/grpc.health.v1.Health/Check", st.binary(max_size=64)),
    probe(GENERATION + "Generate", st.binary(max_size=64)),
    probe(ADAPTERS + "GetAdapter", st.binary(max_size=64)),
)


def encode(message: object) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def identity(data: bytes) -> bytes:
    return data


def send(channel: grpc.Channel, call: Probe) -> grpc.StatusCode:
    """Make the call with raw bytes; its final status code."""
    options = {"request_serializer": encode, "response_deserializer": identity}
    meta = metadata(call.key) if call.key else None
    try:
        if isinstance(call.request, list):
            channel.stream_unary(call.method, **options)(
                iter(call.request), metadata=meta, timeout=60
            )
        elif call.streams_reply:
            replies = channel.unary_stream(call.method, **options)
            list(replies(call.request, metadata=meta, timeout=60))
        else:
            channel.unary_unary(call.method, **options)(call.request, metadata=meta, timeout=60)
    except grpc.RpcError as error:
        assert len(error.details() or "") < 3000, error.details()[:200]
        return error.code()
    return Code.OK


def test_every_rpc_answers_only_documented_codes_with_bounded_memory(server):
    process = psutil.Process(server.pid)
    seen: Counter[tuple[str, str]] = Counter()
    with grpc.insecure_channel(server.address) as channel:
        for _ in range(3):  # warm-up: every path once, so first-use allocations are not counted
            send(channel, Probe(GENERATION + "Generate", gpb.GenerateRequest(), "fuzz-key"))
        before = process.memory_info().rss
        ends = time.monotonic() + FUZZ_SECONDS

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(call=probes)
        def fuzz(call: Probe) -> None:
            if time.monotonic() > ends and sum(seen.values()) >= MIN_CALLS:
                return
            code = send(channel, call)
            seen[call.method.rsplit("/", 1)[1], code.name] += 1
            assert code in DOCUMENTED, (call, code)

        fuzz()
        after = process.memory_info().rss
    print(f"figure: {sum(seen.values())} calls, RSS {before >> 20} -> {after >> 20} MiB, {seen}")
    assert sum(seen.values()) >= MIN_CALLS, seen
    assert after - before < MAX_RSS_GROWTH, (before, after)
