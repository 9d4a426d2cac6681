"""The HTTP face of the server: uvicorn serving `OpenAIFront` on the gRPC server's event loop.

`HttpServer(state, port)` builds it, serving HTTPS with the gRPC port's certificate when the
config names one (and requiring client certificates when it names a client CA, as gRPC does);
`start()` binds the port itself (False when it cannot: the caller says so and exits, as for the
gRPC port) and serves from then on; `stop()` closes the listener and the idle connections. The
process's signals stay `loraserve.app`'s: uvicorn's own handlers are never installed, so
SIGTERM drains both APIs the one way.

Knows nothing about loading the model or draining: `loraserve.app` drives it after gRPC drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from loraserve.api.http.routes import OpenAIFront
from loraserve.api.state import ServerState

STOP_GRACE_S = 5.0  # for responses still being written when stop() is called


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The application handles signals; uvicorn's would replace its SIGTERM drain."""
        yield


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    def __init__(self, state: ServerState, port: int) -> None:
        self.host = state.config.host
        self.port = port
        self.address = f"{self.host}:{port}"
        settings = state.config
        config = uvicorn.Config(
            OpenAIFront(state).app(),
            host=self.host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(STOP_GRACE_S),
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            ssl_ca_certs=settings.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca else ssl.CERT_NONE,
        )
        self._server = _Server(config)
        self._serving: asyncio.Future[None] | None = None

    async def start(self) -> bool:
        """Bind and serve; False when the address cannot be bound."""
        self._server.config.load()  # the app and TLS context, before anything is bound
        try:
            sock = _listening_socket(self.host, self.port)
        except OSError:
            return False
        self._serving = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        return True

    async def stop(self) -> None:
        if self._serving is None:
            return
        self._server.should_exit = True
        await self._serving
