"""If the engine thread dies, health turns NOT_SERVING and callers get UNAVAILABLE errors."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from tests.engine.helpers import make_core

from loraserve.api.auth import Authenticator
from loraserve.api.errors import status_of
from loraserve.api.server import GrpcServer
from loraserve.api.state import ServerState
from loraserve.app import watch_engine
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.metrics import Metrics
from loraserve.types import EngineDeadError, GenerateRequest, SamplingParams


class FakeContext:
    """Enough of a servicer context for HealthServicer.Check."""

    def set_code(self, code) -> None:
        self.code = code


async def status(health: HealthServicer) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), FakeContext())
    return reply.status


def die() -> None:
    raise SystemExit("the engine loop broke")


async def test_a_dead_engine_turns_health_not_serving_and_fails_callers(model_dirs):
    engine = AsyncEngine(make_core(model_dirs["llama"]))
    server = GrpcServer(ServerState(ServerConfig(), Authenticator(None), Metrics()))
    await server.set_serving(True)
    assert await status(server.health) == health_pb2.HealthCheckResponse.SERVING
    watcher = asyncio.ensure_future(watch_engine(engine, server))
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)
    long = GenerateRequest(prompt="hello", sampling=params)
    events = await engine.generate(long)
    await anext(events)
    engine.call(die)
    with pytest.raises(EngineDeadError) as in_flight:
        async for _ in events:
            pass
    await asyncio.wait_for(watcher, timeout=30)
    assert await status(server.health) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(EngineDeadError) as new_call:
        await engine.generate(long)
    assert status_of(in_flight.value).name == status_of(new_call.value).name == "UNAVAILABLE"
