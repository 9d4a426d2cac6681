"""The gRPC face of the server: one grpc.aio server with the servicers, auth, health, reflection.

`GrpcServer(state)` builds it; `start()` binds and serves with health NOT_SERVING (other calls
end UNAVAILABLE until `state.runtime` is set), `set_serving` flips health for the server and
each service, `drain(grace)` turns health NOT_SERVING, refuses new calls with UNAVAILABLE and
lets in-flight calls finish within the grace period.

Knows nothing about loading the model or the engine's lifecycle: `loraserve.app` drives it.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loraserve.api.adapters import AdapterServicer
from loraserve.api.auth import AuthInterceptor
from loraserve.api.decoding import DecodingInterceptor
from loraserve.api.generation import GenerationServicer
from loraserve.api.info import ServerInfoServicer
from loraserve.api.state import ServerState
from loraserve.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
)
OVERALL = ""  # the health service's name for the server as a whole


class GrpcServer:
    def __init__(self, state: ServerState) -> None:
        config = state.config
        self.state = state
        self.address = f"{config.host}:{config.port}"
        self.health = HealthServicer()
        self._server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(state.auth, state.metrics),
                DecodingInterceptor(state.metrics),
            ],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        server = self._server
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(state), server
        )
        server_pb2_grpc.add_ServerServiceServicer_to_server(ServerInfoServicer(state), server)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(state), server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )

    async def start(self) -> bool:
        """Bind and serve, NOT_SERVING; False when the address cannot be bound."""
        await self.set_serving(False)
        if self._server.add_insecure_port(self.address) == 0:
            return False
        await self._server.start()
        return True

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if serving:
            status = health_pb2.HealthCheckResponse.SERVING
        for name in (OVERALL, *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self, grace_seconds: float) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_seconds)
