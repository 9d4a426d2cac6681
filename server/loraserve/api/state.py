"""What the servicers share: config, authenticator, and the engine and store once they are up.

Knows nothing about protobuf messages; it only decides whether a call may reach the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loraserve.adapters.store import AdapterStore
from loraserve.api.auth import Authenticator
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.metrics import Metrics
from loraserve.model.loading import LoadedModel


@dataclass
class ServerState:
    config: ServerConfig
    auth: Authenticator
    metrics: Metrics
    engine: AsyncEngine | None = None
    store: AdapterStore | None = None
    loaded: LoadedModel | None = None
    draining: bool = False
    startup_error: str | None = None

    async def engine_or_abort(self, context: grpc.aio.ServicerContext) -> AsyncEngine:
        """The running engine, or end the call with UNAVAILABLE saying why it is not there."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.engine is None:
            reason = self.startup_error or "the model is still loading; retry shortly"
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        if not self.engine.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine stopped; see server log")
        return self.engine
