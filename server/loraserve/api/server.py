"""The gRPC face of the server: one grpc.aio server with the servicers, auth, health, reflection.

`GrpcServer(state)` builds it; `start()` binds and serves with health NOT_SERVING (other calls
end UNAVAILABLE until `state.runtime` is set), over TLS when the config names a certificate
(and requiring client certificates when it names a client CA: mTLS). `set_serving` flips
health for the server and each service. `drain(grace)` turns health NOT_SERVING and refuses new
calls with UNAVAILABLE at once, but keeps listening, so probes see NOT_SERVING, until the calls
in flight have finished or the grace period is over; only then does the listener close.

Knows nothing about loading the model or the engine's lifecycle: `loraserve.app` drives it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loraserve.api.adapters import AdapterServicer
from loraserve.api.auth import AuthInterceptor
from loraserve.api.calls import CallInterceptor
from loraserve.api.decoding import DecodingInterceptor
from loraserve.api.generation import GenerationServicer
from loraserve.api.info import ServerInfoServicer
from loraserve.api.state import ServerState
from loraserve.config import ServerConfig
from loraserve_client.v1 import (
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


def _pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read it: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def tls_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (None: plaintext); ValueError names an unusable file."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    pair = (_pem(config.tls_key, "--tls-key"), _pem(config.tls_cert, "--tls-cert"))
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _pem(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class GrpcServer:
    """credentials: TLS for the port (see `tls_credentials`); None serves plaintext."""

    def __init__(
        self, state: ServerState, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        config = state.config
        self.state = state
        self.address = f"{config.host}:{config.port}"
        self.health = HealthServicer()
        self._credentials = credentials
        self._server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(state.auth, state.metrics),
                DecodingInterceptor(state.metrics),
                CallInterceptor(state.calls),
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
        try:
            if self._credentials is None:
                port = self._server.add_insecure_port(self.address)
            else:
                port = self._server.add_secure_port(self.address, self._credentials)
        except RuntimeError:  # newer grpc raises where older ones returned 0
            return False
        if port == 0:
            return False
        await self._server.start()
        return True

    async def set_serving(self, serving: bool) -> None:
        self.state.serving = serving
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if serving:
            status = health_pb2.HealthCheckResponse.SERVING
        for name in (OVERALL, *SERVICE_NAMES):
            await self.health.set(name, status)

    async def drain(self, grace_seconds: float) -> None:
        """NOT_SERVING and refuse new calls now; keep listening until the calls in flight have
        finished (or the grace period is over), then close, cancelling any still running."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.state.calls.wait_idle(grace_seconds)
        await self._server.stop(max(0.0, grace_seconds - (loop.time() - started)))
