"""Composition: build the engine and its adapter parts from the configuration, run the server.

`build_runtime` sets the compute threads (`model.cpus`), loads the base model (without one
configured, the built-in demo, trained into the user's cache on first use), opens the adapter
store (and the thread that keeps it current with other processes sharing its root), builds the
engine core around it, the publisher that hands validated uploads to the host tier and the
catalog the API serves, shares the start-up adapters (the demo's too) with every tenant, makes
the CPU decode records steps of every batch size will replay (`EngineCore.record_decode_steps`)
and starts the engine thread. `serve` runs the process: the gRPC server binds at once (health
NOT_SERVING, calls UNAVAILABLE) so Kubernetes can probe it, and so does the OpenAI-compatible
HTTP API when `http_port` is set (503 until then), the runtime is built off the event loop and
warmed up with one generation, the objects start-up made are frozen out of the garbage
collector's passes, then health turns SERVING. SIGHUP reloads the API-keys file (a
bad one is logged and the keys in use stay). SIGTERM or SIGINT drains both APIs (health
NOT_SERVING and new calls refused at once, the listeners open until in-flight calls finish or
the grace period ends) and `serve` returns 0; a failed start-up logs why and returns 1, a bad
keys file or TLS file 2.

The only module that knows every layer; no layer imports it.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import start_http_server

import loraserve
from loraserve.adapters.catalog import AdapterCatalog
from loraserve.adapters.manifest import base_fingerprint
from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.store_watch import StoreWatcher
from loraserve.api.auth import Authenticator
from loraserve.api.http.server import HttpServer
from loraserve.api.server import GrpcServer, tls_credentials
from loraserve.api.state import ModelFacts, Runtime, ServerState
from loraserve.config import ServerConfig
from loraserve.demo import demo_model
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.core import EngineCore
from loraserve.metrics import Metrics
from loraserve.model.cpus import in_passing_thread, serial_executor, set_compute_threads
from loraserve.model.loading import load_base_model, quantized_bytes
from loraserve.types import (
    DEFAULT_TENANT,
    AdapterRefusedError,
    GenerateRequest,
    LoraServeError,
    SamplingParams,
)

log = logging.getLogger(__name__)

RuntimeBuilder = Callable[[ServerConfig, Metrics], Runtime]


def one_line(error: BaseException) -> str:
    """An error on one line: an adapter's refusal with every problem it lists (they are few and
    short), any other error's first line (library errors can run to a page)."""
    if isinstance(error, AdapterRefusedError):
        return error.one_line()
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass(frozen=True)
class ServedModel:
    model: str  # an HF model directory or hub id
    shared_adapters: tuple[tuple[str, str], ...]  # (name, PEFT directory), for every tenant


def served_model(config: ServerConfig) -> ServedModel:
    """The configured model and adapters or, without a model, the built-in demo with its
    adapters (trained on first use; an `--adapter` of the same name wins)."""
    if config.engine.model is not None:
        return ServedModel(config.engine.model, config.adapters)
    demo = demo_model(rebuild=config.rebuild_demo)
    given = {name for name, _ in config.adapters}
    built_in = tuple((name, str(path)) for name, path in demo.adapters.items() if name not in given)
    return ServedModel(str(demo.base), built_in + config.adapters)


def build_runtime(config: ServerConfig, metrics: Metrics) -> Runtime:
    """Load the base model, open the adapter store, load start-up adapters, start the engine."""
    engine_config = config.engine
    threads = set_compute_threads(engine_config.compute_threads)
    served = served_model(config)
    model = served.model
    try:
        loaded = load_base_model(
            model,
            engine_config.quantization,
            engine_config.compute_dtype,
            engine_config.device,
            engine_config.double_quant,
            engine_config.quantize_output,
        )
    except (OSError, ValueError) as error:  # transformers' own words, often a page long
        raise ValueError(f"cannot load the model {model!r}: {one_line(error)}") from error
    held = quantized_bytes(loaded.model)
    if held.quantized:
        log.info(
            "%s projections hold %.1f MiB (%.2f of their %.1f MiB in bf16%s)",
            loaded.quantization,
            held.quantized / 2**20,
            held.quantized / held.bf16,
            held.bf16 / 2**20,
            ", block scales double-quantized" if engine_config.double_quant else "",
        )
    store = AdapterStore(config.adapter_dir)
    core = EngineCore(loaded, engine_config, metrics, store=store)
    manager = core.adapters
    publisher = AdapterPublisher(
        store,
        base_fingerprint(loaded.model.config.to_dict(), loaded.quantization),
        manager.targets,
        engine_config.max_rank,
        loaded.compute_dtype,
        on_published=manager.keep_in_host,
        prepare=manager.prepare,
    )
    catalog = AdapterCatalog(store, publisher, manager)
    for name, directory in served.shared_adapters:
        catalog.share(name, directory)
        log.info("shared adapter %r from %s with every tenant", name, directory)
    core.record_decode_steps()  # before the engine thread: no request waits for a recording
    metrics.attach_live(core.live_state, gateway=config.gateway_metrics)
    metrics.build_info.info(
        {
            "version": loraserve.__version__,
            "base_model": config.model_name,
            "quantization": loaded.quantization,
            "compute_dtype": engine_config.compute_dtype,
            "device": str(loaded.device),
            "compute_threads": str(threads),
        }
    )
    engine = AsyncEngine(core)
    interval_s = config.store_refresh_ms / 1000
    StoreWatcher(store, manager.forget, interval_s, running=lambda: engine.alive).start()
    return Runtime(
        engine=engine,
        adapters=catalog,
        model=ModelFacts(
            quantization=loaded.quantization,
            device=str(loaded.device),
            max_context=core.max_context,
            output_projection=loaded.output_projection,
            kv_cache_dtype=core.kv_cache_dtype,
        ),
    )


async def warm_up(engine: AsyncEngine) -> None:
    """One tiny generation through the whole path before reporting SERVING."""
    request = GenerateRequest(prompt_token_ids=(0,), sampling=SamplingParams(max_new_tokens=2))
    async for _ in await engine.generate(request):
        pass


def freeze_start_up_objects() -> int:
    """Collects the start-up's garbage, then moves every object left (the model's modules,
    transformers' and torch's tables, the catalog) into the collector's permanent generation:
    a full collection then walks only what serving allocates since, not the half a million
    objects a loaded model holds (180 ms with the GIL held, every stream paused, for the
    benchmark's default model; about nothing after: benchmarks/RESULTS.md, 2026-12-05). Frozen
    objects are still freed when their last reference goes. Returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def watch_engine(engine: AsyncEngine, server: GrpcServer) -> None:
    """NOT_SERVING as soon as the engine thread ends, whatever ended it."""
    await asyncio.to_thread(engine.join)
    await server.set_serving(False)


async def serve(
    config: ServerConfig, stop: asyncio.Event | None = None, build: RuntimeBuilder = build_runtime
) -> int:
    """Run until `stop` is set or SIGTERM / SIGINT arrives; returns the exit status.

    build: makes the runtime on a worker thread (a test passes one that waits for its cue).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(config, stop, build)
    finally:
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def reload_keys(auth: Authenticator) -> None:
    """SIGHUP: read the keys file again; a bad file leaves the keys in use and says why.
    Calls in flight finish as they are; the next call is checked against the new keys."""
    try:
        table = auth.reload()
    except ValueError as error:
        log.error("API keys not reloaded; the keys in use stay: %s", error)
        return
    log.info(
        "API keys reloaded from %s: %d keys, %d tenants",
        auth.path,
        len(table.principals),
        len(table.tenants),
    )


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (a name other than localhost is
    taken as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _serve(config: ServerConfig, stop: asyncio.Event, build: RuntimeBuilder) -> int:
    try:
        auth = Authenticator.from_file(config.api_keys)
        credentials = tls_credentials(config)
    except ValueError as error:
        log.error("%s", error)
        return 2
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_keys, auth)
    if auth.development_mode:
        log.warning(
            "no --api-keys file: single-tenant development mode (every caller is tenant %r "
            "with every scope); bound to %s",
            DEFAULT_TENANT,
            config.host,
        )
    elif credentials is None and not is_loopback(config.host):
        log.warning(
            "API keys will travel in cleartext: bound to %s without TLS; pass --tls-cert and "
            "--tls-key, or terminate TLS in front of the server on this host",
            config.host,
        )
    metrics = Metrics(names=config.metrics_names, process=True)
    state = ServerState(config, auth, metrics)
    metrics_server = None
    if config.metrics_port is not None:
        metrics_server, _ = start_http_server(
            config.metrics_port, addr=config.metrics_host, registry=metrics.registry
        )
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
    server = GrpcServer(state, credentials)
    if not await server.start():
        log.error("cannot bind %s", server.address)
        return 1
    log.info(
        "listening on %s (NOT_SERVING until the model is loaded and warmed up)", server.address
    )
    http = None if config.http_port is None else HttpServer(state, config.http_port)
    if http is not None:
        if not await http.start():
            log.error("cannot bind %s for the HTTP API", http.address)
            await server.drain(0.0)
            return 1
        log.info("OpenAI-compatible HTTP API on http://%s/v1", http.address)

    # Helper threads' torch ops stay on them; the model loads on every CPU, on a thread that ends
    # with the load: the engine's thread keeps the only OpenMP team (see model/cpus.py).
    asyncio.get_running_loop().set_default_executor(serial_executor())
    loading = in_passing_thread(build, config, metrics)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
    watcher = None
    if loading.done():
        try:
            state.runtime = loading.result()
            await warm_up(state.runtime.engine)
            frozen = freeze_start_up_objects()
            log.info("%d start-up objects left out of the garbage collector's passes", frozen)
            await server.set_serving(True)
            watcher = asyncio.ensure_future(watch_engine(state.runtime.engine, server))
            log.info("SERVING %s", config.model_name)
        except (OSError, ValueError, LoraServeError) as error:  # a bad model, store, adapter
            state.startup_error = f"start-up failed: {one_line(error)}"
            log.error("%s", state.startup_error)
            stop.set()
        except Exception as error:  # a defect: the traceback helps
            state.startup_error = f"start-up failed: {one_line(error)}"
            log.exception("start-up failed")
            stop.set()
    await stopping

    log.info("draining: NOT_SERVING, refusing new calls, %.0fs grace", config.drain_grace_seconds)
    await server.drain(config.drain_grace_seconds)
    if http is not None:
        await http.stop()
    if state.runtime is not None:
        state.runtime.engine.shutdown()
        if watcher is not None:
            await watcher
    else:
        loading.cancel()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return 0 if state.startup_error is None else 1
