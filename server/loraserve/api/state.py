"""What the servicers share: config, authenticator, and the runtime once the model is up.

Knows nothing about protobuf messages; it only decides whether a call may reach the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from loraserve.adapters.catalog import AdapterCatalog
from loraserve.api.auth import Authenticator
from loraserve.api.calls import CallTracker
from loraserve.api.errors import abort
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.metrics import Metrics


@dataclass(frozen=True)
class ModelFacts:
    """What clients are told about the loaded base model."""

    quantization: str
    device: str
    max_context: int  # the most tokens (prompt + generated) one request may hold
    output_projection: str  # nf4 / fp4 / int8 (quantize_output), else the dtype it computes in
    kv_cache_dtype: str  # fp32 / bf16 / fp16 / int8: what the KV pools hold


@dataclass(frozen=True)
class Runtime:
    """Everything a call reaches once start-up finished (built by `loraserve.app`)."""

    engine: AsyncEngine
    adapters: AdapterCatalog
    model: ModelFacts


@dataclass
class ServerState:
    config: ServerConfig
    auth: Authenticator
    metrics: Metrics
    runtime: Runtime | None = None
    serving: bool = False  # what health says for the server: SERVING (True) or not
    draining: bool = False
    startup_error: str | None = None
    calls: CallTracker = field(default_factory=CallTracker)

    async def runtime_or_abort(self, context: grpc.aio.ServicerContext) -> Runtime:
        """The running runtime, or end the call with UNAVAILABLE saying why it is not there."""
        unavailable = grpc.StatusCode.UNAVAILABLE
        if self.draining:
            await abort(context, unavailable, "the server is shutting down")
        if self.runtime is None:
            reason = self.startup_error or "the model is still loading; retry shortly"
            await abort(context, unavailable, reason)
        if not self.runtime.engine.alive:
            await abort(context, unavailable, "the engine stopped; see server log")
        return self.runtime
