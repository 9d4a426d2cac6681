"""Promise: if the engine thread dies, health turns NOT_SERVING and every call, in flight or new,
ends UNAVAILABLE. The server runs in this process (`serve` on a loopback port), so the test can
break its engine loop; everything else is the real server, probed over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.api.server_process import free_port

from loraserve.api.state import Runtime
from loraserve.app import build_runtime, serve
from loraserve.config import EngineConfig, ServerConfig
from loraserve.metrics import Metrics
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow  # builds a server
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def die() -> None:
    raise SystemExit("the engine loop broke")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # meant to
async def test_a_dead_engine_turns_health_not_serving_and_fails_callers(model_dirs, tmp_path):
    built: list[Runtime] = []

    def build(config: ServerConfig, metrics: Metrics) -> Runtime:
        built.append(build_runtime(config, metrics))
        return built[0]

    port = free_port()
    engine = EngineConfig(model=str(model_dirs["llama"]), device="cpu")
    config = ServerConfig(engine=engine, port=port, adapter_dir=str(tmp_path / "store"))
    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(config, stop, build=build))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=300)
            while (await watch.read()).status != SERVING:
                pass
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            long = gpb.GenerationInput(text="hello", max_new_tokens=2000, ignore_eos=True)
            stream = stub.GenerateStream(gpb.GenerateStreamRequest(input=long), timeout=300)
            assert (await stream.read()).HasField("token")

            built[0].engine.call(die)
            with pytest.raises(grpc.aio.AioRpcError) as in_flight:
                while await stream.read() != grpc.aio.EOF:
                    pass
            assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine stopped" in in_flight.value.details()
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as new_call:
                await stub.Generate(gpb.GenerateRequest(input=long), timeout=30)
            assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        assert await asyncio.wait_for(serving, 120) == 0
