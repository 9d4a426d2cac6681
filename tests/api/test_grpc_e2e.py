"""End to end over real gRPC on loopback, against a real `loraserve serve` process."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.api.buf import buf_or_skip
from tests.api.server_process import free_port, running_server
from tests.engine.helpers import make_core, run

from loraserve.api.server import SERVICE_NAMES
from loraserve.app import build_runtime, serve
from loraserve.config import EngineConfig, ServerConfig
from loraserve.types import GenerateRequest, SamplingParams
from loraserve_client.v1 import generation_pb2 as pb
from loraserve_client.v1 import generation_pb2_grpc, server_pb2, server_pb2_grpc

pytestmark = pytest.mark.slow  # real server processes

ADAPTERS = ("r4-attn", "r8-all", "r64-all")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTS = ("The quick brown fox", "LoRA adapts a frozen", "Café 🙂", "def forward(self, x):")
MAX_NEW = 8


@pytest.fixture(scope="module")
def server(model_dirs, adapter_dirs, tmp_path_factory):
    flags = ["--model", str(model_dirs["llama"]), "--compute-dtype", "fp32", "--device", "cpu"]
    for name in ADAPTERS:
        flags += ["--adapter", f"{name}={adapter_dirs['llama'][name]}"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(*flags, log_path=log) as (address, _):
        yield address


@pytest.fixture(scope="module")
def expected(model_dirs, adapter_dirs):
    """Greedy tokens of each (prompt, adapter) from the engine in-process, one at a time."""
    core = make_core(model_dirs["llama"])
    for name in ADAPTERS:
        core.adapters.load(name, adapter_dirs["llama"][name])
    want = {}
    for prompt in PROMPTS:
        for adapter in (None, *ADAPTERS):
            request = GenerateRequest(
                prompt=prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=MAX_NEW)
            )
            want[prompt, adapter] = run(core, {0: [request]})[0].tokens
    return want


def generation_input(prompt: str, adapter: str | None, **fields) -> pb.GenerationInput:
    return pb.GenerationInput(
        text=prompt, adapter=pb.AdapterRef(name=adapter or ""), max_new_tokens=MAX_NEW, **fields
    )


async def test_health_is_not_serving_until_the_model_is_up(model_dirs, tmp_path):
    """The port answers from the start: NOT_SERVING, and UNAVAILABLE for calls, for as long as
    the model is loading (here: until the test lets the build go on), then SERVING, with the
    objects start-up made frozen out of the garbage collector's passes."""
    building, release = threading.Event(), threading.Event()
    frozen_before = gc.get_freeze_count()

    def gated_build(config, metrics):
        building.set()
        assert release.wait(120), "the test never released the build"
        return build_runtime(config, metrics)

    engine = EngineConfig(model=str(model_dirs["llama"]), device="cpu")
    port = free_port()
    config = ServerConfig(engine=engine, port=port, adapter_dir=str(tmp_path / "store"))
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(config, stop, build=gated_build))
    names = ("", *SERVICE_NAMES)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await health.Check(request, wait_for_ready=True, timeout=60)
                return reply.status

            assert await asyncio.to_thread(building.wait, 60)
            assert [await status(n) for n in names] == [NOT_SERVING] * len(names)
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(pb.GenerateRequest(input=generation_input("hi", None)))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in caught.value.details()

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert (await watch.read()).status == NOT_SERVING
            release.set()
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert gc.get_freeze_count() > frozen_before
            assert [await status(n) for n in names] == [SERVING] * len(names)
            reply = await stub.Generate(pb.GenerateRequest(input=generation_input("hi", None)))
            assert reply.usage.completion_tokens > 0
    finally:
        release.set()
        stop.set()
        assert await asyncio.wait_for(serving, 120) == 0
        gc.unfreeze()  # this test process's objects back under the collector


def test_unary_and_streaming_with_several_adapters_at_once(server, expected):
    address = server
    cases = [(p, a) for p in PROMPTS for a in (None, *ADAPTERS)]

    def unary(case):
        with grpc.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            reply = stub.Generate(pb.GenerateRequest(input=generation_input(*case)), timeout=60)
        return list(reply.token_ids), reply

    def stream(case):
        with grpc.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            messages = list(
                stub.GenerateStream(
                    pb.GenerateStreamRequest(input=generation_input(*case, logprobs=True)),
                    timeout=60,
                )
            )
        return messages

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        unary_results = list(pool.map(unary, cases))
        stream_results = list(pool.map(stream, cases))

    for case, (tokens, reply) in zip(cases, unary_results):
        assert tokens == expected[case], case
        assert reply.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert reply.usage.completion_tokens == len(tokens)
        assert reply.usage.prompt_tokens > 0
    for case, messages in zip(cases, stream_results):
        tokens = [m.token.token_id for m in messages if m.WhichOneof("event") == "token"]
        assert tokens == expected[case], case
        assert all(m.token.HasField("logprob") for m in messages[:-1])
        assert messages[-1].WhichOneof("event") == "final"
        assert messages[-1].final.usage.completion_tokens == len(tokens)
    # The adapters really change the output.
    assert len({tuple(expected[PROMPTS[0], a]) for a in (None, *ADAPTERS)}) > 1


def test_server_info(server):
    with grpc.insecure_channel(server) as channel:
        info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
            server_pb2.GetServerInfoRequest(), timeout=10
        )
    assert info.quantization == "nf4"
    assert info.device == "cpu"
    assert info.max_rank == 64
    assert info.device_slots == 8
    assert info.max_context > 0
    assert info.version
    assert info.output_projection == "fp32"  # quantize_output off
    assert info.prefix_caching and not info.batch_invariant
    assert info.kv_cache_dtype == "fp32"  # the compute dtype's


@pytest.mark.parametrize(
    ("options", "projection", "kv_cache"),
    [
        (["--quantize-output"], "nf4", "fp32"),
        (["--quantize-output", "int8", "--kv-cache-dtype", "int8"], "int8", "int8"),
    ],
    ids=["the-flag-alone", "int8"],
)
def test_server_info_reports_how_the_server_computes(
    options, projection, kv_cache, model_dirs, tmp_path
):
    flags = ["--model", str(model_dirs["llama"]), "--compute-dtype", "fp32", "--device", "cpu",
             *options, "--batch-invariant", "--no-prefix-caching"]  # fmt: skip
    with (
        running_server(*flags, log_path=tmp_path / "server.log") as (address, _),
        grpc.insecure_channel(address) as channel,
    ):
        info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
            server_pb2.GetServerInfoRequest(), timeout=10
        )
    assert info.output_projection == projection
    assert info.kv_cache_dtype == kv_cache
    assert info.batch_invariant and not info.prefix_caching


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ({"adapter": pb.AdapterRef(name="nope")}, grpc.StatusCode.NOT_FOUND, "'nope'"),
        (
            {"sampling": pb.SamplingParams(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        ({"sampling": pb.SamplingParams(top_p=0)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"max_new_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "context limit"),
        ({"token_ids": pb.TokenIds(ids=[10**6])}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        ({"stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ],
)
def test_bad_input_gets_its_status(server, fields, code, words):
    message = pb.GenerationInput(text="hello", max_new_tokens=4)
    for key, value in fields.items():
        if isinstance(value, (pb.AdapterRef, pb.SamplingParams, pb.TokenIds)):
            getattr(message, key).CopyFrom(value)
        elif isinstance(value, list):
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)
    with grpc.insecure_channel(server) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(input=message), timeout=10)
    assert caught.value.code() == code
    assert words in caught.value.details()


def test_missing_prompt_is_invalid(server):
    with grpc.insecure_channel(server) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(input=pb.GenerationInput()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.text or input.token_ids" in caught.value.details()


def test_deadline_and_cancel_leave_the_server_serving(server, expected):
    address = server
    long_input = generation_input(PROMPTS[0], None, ignore_eos=True)
    long_input.max_new_tokens = 1000
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(input=long_input), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.GenerateStream(pb.GenerateStreamRequest(input=long_input), timeout=60)
        next(call)
        call.cancel()
        reply = stub.Generate(
            pb.GenerateRequest(input=generation_input(PROMPTS[1], "r8-all")), timeout=60
        )
    assert list(reply.token_ids) == expected[PROMPTS[1], "r8-all"]


def test_buf_curl_calls_health_and_generate_through_reflection(server, expected):
    buf = buf_or_skip()
    address = server
    base = ["--protocol", "grpc", "--http2-prior-knowledge", "--timeout", "60s"]

    def curl(method: str, data: str) -> dict:
        result = subprocess.run(
            [buf, "curl", *base, "--data", data, f"http://{address}/{method}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert curl("grpc.health.v1.Health/Check", "{}") == {"status": "SERVING"}
    request = {
        "input": {"text": PROMPTS[2], "adapter": {"name": "r64-all"}, "maxNewTokens": MAX_NEW}
    }
    reply = curl("loraserve.v1.GenerationService/Generate", json.dumps(request))
    assert [int(t) for t in reply["tokenIds"]] == expected[PROMPTS[2], "r64-all"]
    assert reply["finishReason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")


def test_a_missing_model_is_refused_in_one_line_before_start_up(tmp_path):
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(free_port()),
               "--model", str(tmp_path / "no-such-model"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no-such-model" in done.stderr


def test_a_failed_start_up_says_why_in_one_line_and_exits_1(tmp_path):
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(free_port()),
               "--model", str(model), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if "start-up failed" in line]
    assert len(failed) == 1 and "no-such-architecture" in failed[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_start_up_adapter_lists_its_problems_on_the_failure_line(tmp_path, model_dirs):
    adapter = tmp_path / "bad-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(free_port()),
               "--model", str(model_dirs["llama"]), "--device", "cpu",
               "--adapter-dir", str(tmp_path / "store"), "--adapter", f"bad={adapter}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if "start-up failed" in line]
    assert len(failed) == 1, done.stderr
    # the headline names the adapter; the problem after it says what is wrong with which file
    assert "adapter at 'bad-lora' is invalid: adapter_model.safetensors: header" in failed[0]
