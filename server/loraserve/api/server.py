"""The gRPC server's lifecycle: bind, load and warm the model, serve, drain on SIGTERM.

The port is open from the first moment so Kubernetes can probe it: health says NOT_SERVING
(and other calls UNAVAILABLE) until the model is loaded and one warm-up generation has run,
then SERVING. A start-up that fails (model, store, start-up adapters) logs why and exits 1.
SIGTERM or SIGINT flips health to NOT_SERVING, refuses new calls with UNAVAILABLE, lets
in-flight calls finish within the grace period, then returns (the process exits 0).

Knows nothing about request translation (the servicers) or batching (the engine).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

import loraserve
from loraserve.adapters.manifest import base_fingerprint
from loraserve.adapters.store import AdapterStore
from loraserve.api.adapters import AdapterServicer
from loraserve.api.auth import Authenticator, AuthInterceptor
from loraserve.api.generation import GenerationServicer
from loraserve.api.info import ServerInfoServicer
from loraserve.api.state import ServerState
from loraserve.config import ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.core import EngineCore
from loraserve.metrics import Metrics
from loraserve.model.loading import LoadedModel, load_base_model
from loraserve.model.tiny import default_model_dir
from loraserve.types import DEFAULT_TENANT, GenerateRequest, SamplingParams
from loraserve.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
)
OVERALL = ""  # the health service's name for the server as a whole


def build_engine(
    config: ServerConfig, metrics: Metrics
) -> tuple[AsyncEngine, LoadedModel, AdapterStore]:
    """Load the base model, open the adapter store, load start-up adapters, start the engine."""
    engine_config = config.engine
    model = engine_config.model or str(default_model_dir())
    loaded = load_base_model(
        model, engine_config.quantization, engine_config.compute_dtype, engine_config.device
    )
    core = EngineCore(loaded, engine_config, metrics)
    metrics.attach_live(core.live_state, gateway=config.gateway_metrics)
    metrics.build_info.info(
        {
            "version": loraserve.__version__,
            "base_model": config.model_name,
            "quantization": loaded.quantization,
            "compute_dtype": engine_config.compute_dtype,
            "device": str(loaded.device),
        }
    )
    fingerprint = base_fingerprint(loaded.model.config.to_dict(), loaded.quantization)
    store = AdapterStore(
        config.adapter_dir, fingerprint, core.adapters.targets, engine_config.max_rank
    )
    core.adapters.store = store
    for name, directory in config.adapters:
        core.adapters.load(name, directory)
        log.info("loaded adapter %r from %s", name, directory)
    return AsyncEngine(core), loaded, store


async def warm_up(engine: AsyncEngine) -> None:
    """One tiny generation through the whole path before reporting SERVING."""
    request = GenerateRequest(prompt_token_ids=(0,), sampling=SamplingParams(max_new_tokens=2))
    async for _ in engine.generate(request):
        pass


async def watch_engine(engine: AsyncEngine, health: HealthServicer) -> None:
    """NOT_SERVING as soon as the engine thread ends, whatever ended it."""
    await asyncio.to_thread(engine.join)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in (OVERALL, *SERVICE_NAMES):
        await health.set(name, status)


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> int:
    """Run until `stop` is set or SIGTERM / SIGINT arrives; returns the exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        auth = Authenticator.from_file(config.api_keys)
    except ValueError as error:
        log.error("%s", error)
        return 2
    if auth.development_mode:
        log.warning(
            "no --api-keys file: single-tenant development mode (every caller is tenant %r "
            "with every scope); bound to %s",
            DEFAULT_TENANT,
            config.host,
        )
    metrics = Metrics()
    state = ServerState(config, auth, metrics)
    metrics_server = None
    if config.metrics_port is not None:
        metrics_server, _ = start_http_server(
            config.metrics_port, addr=config.host, registry=metrics.registry
        )
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auth, metrics)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    health = HealthServicer()
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(state), server)
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
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        log.error("cannot bind %s", address)
        return 1
    await server.start()
    log.info("listening on %s (NOT_SERVING until the model is loaded and warmed up)", address)

    loading = asyncio.ensure_future(asyncio.to_thread(build_engine, config, metrics))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    watcher = None
    if loading.done():
        try:
            state.engine, state.loaded, state.store = loading.result()
            await warm_up(state.engine)
            await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
            watcher = asyncio.ensure_future(watch_engine(state.engine, health))
            log.info("SERVING %s", config.model_name)
        except Exception as error:  # a bad model, store or adapter: say why and exit 1
            state.startup_error = f"start-up failed: {error}"
            log.exception("start-up failed")
            stop.set()
    await stopping

    log.info("draining: NOT_SERVING, refusing new calls, %.0fs grace", config.drain_grace_seconds)
    state.draining = True
    await health.enter_graceful_shutdown()
    await server.stop(config.drain_grace_seconds)
    if state.engine is not None:
        state.engine.shutdown()
        if watcher is not None:
            await watcher
    else:
        loading.cancel()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return 0 if state.startup_error is None else 1
