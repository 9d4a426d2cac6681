"""Ray Serve: replicas that each run one engine, behind Ray Serve's gRPC and HTTP proxies.

`build_app(args)` makes the application (`serve run deploy/ray/serve_config.yaml`, or
`loraserve ray-serve`): one deployment, `LoraServe`, whose replicas each build a whole runtime
(`app.build_runtime`: base model, adapter store, engine) on one GPU where the cluster has GPUs
(`num_gpus=0` on CPU). Every replica opens the same adapter store root, shared as
`adapters/store.py` describes, so an adapter uploaded through one replica is served by all.

Ray's gRPC proxy serves `loraserve.v1.GenerationService`, `AdapterService` and `ServerService`
(`GRPC_SERVICERS` go to `serve.start`'s `grpc_servicer_functions`); a call names the application
in `application` metadata and, for generation, prefetch and pin, the adapter in
`multiplexed_model_id`, which must equal the adapter the request names.
`@serve.multiplexed` with as many models per replica as the engine has device slots records
which adapters each replica holds, and `ray_routing`'s router sends an adapter's requests to
those replicas, or to the adapter's home replica when none holds it. Each call is translated by
the same servicers as the plain gRPC server (`api/`), with the same keys, scopes, quotas and
status codes; the API-key check the gRPC interceptor does is done here. Ray's own backpressure
(`max_queued_requests`) ends a call RESOURCE_EXHAUSTED, as the engine's does. Every reply's
trailing metadata names the replica that served it (`loraserve-replica`, `loraserve-pid`).
Ray's HTTP proxy serves the OpenAI-compatible front (`api/http`), routed by adapter when a call
carries Ray's `serve_multiplexed_model_id` header. Each replica pushes its metrics to Ray's
metrics agent (`ray_metrics`), which Prometheus scrapes on every node.

Knows nothing about the engine's insides: it composes what `app` builds and `api` translates.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.api.adapters import AdapterServicer
from loraserve.api.auth import REQUIRED_SCOPES, Authenticator
from loraserve.api.generation import GenerationServicer
from loraserve.api.http.routes import OpenAIFront
from loraserve.api.info import ServerInfoServicer
from loraserve.api.state import ServerState
from loraserve.app import build_runtime, freeze_start_up_objects, warm_up
from loraserve.config import ServerConfig
from loraserve.metrics import Metrics
from loraserve.model.cpus import in_passing_thread, serial_executor
from loraserve.model.host_memory import ONE_ARENA_ENVIRONMENT
from loraserve.ray_metrics import RegistryMirror, push_forever
from loraserve.ray_routing import AdapterAffinityRouter
from loraserve.settings import load_config
from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import server_pb2 as spb

GRPC_SERVICERS = [
    "loraserve_client.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
    "loraserve_client.v1.adapters_pb2_grpc.add_AdapterServiceServicer_to_server",
    "loraserve_client.v1.server_pb2_grpc.add_ServerServiceServicer_to_server",
]
APP_NAME = "loraserve"
DEPLOYMENT_OPTIONS = ("num_replicas", "max_ongoing_requests", "max_queued_requests")
ACTOR_OPTIONS = ("autoscaling_config", "num_gpus", "num_cpus")
ROUTER_OPTIONS = ("affinity_wait_s", "affinity_imbalance")
RAYS_OWN = {  # server settings whose work Ray's processes do (docs/ray.md)
    "metrics_port": "each replica's metrics go to Ray's metrics agent",
    "http_port": "Ray's HTTP proxy serves the OpenAI-compatible front",
}
REPLICA_KEY, PID_KEY = "loraserve-replica", "loraserve-pid"
GENERATION, ADAPTERS = "/loraserve.v1.GenerationService/", "/loraserve.v1.AdapterService/"


class Aborted(Exception):
    """A call ended with the status set on its Ray context (Ray's proxy sends that status)."""


class RayContext:
    """What the servicers use of `grpc.aio.ServicerContext`, over Ray's serializable context."""

    def __init__(self, context: RayServegRPCContext, replica: tuple[tuple[str, str], ...]):
        self._context = context
        self._replica = replica
        context.set_trailing_metadata(list(replica))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._context.invocation_metadata())

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy holds the deadline (`request_timeout_s`)

    def code(self) -> grpc.StatusCode | None:
        return self._context.code()

    async def abort(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> NoReturn:
        self._context.set_code(code)
        self._context.set_details(details)
        text = [(k, v) for k, v in trailing if isinstance(v, str)]  # binary details: gRPC only
        self._context.set_trailing_metadata([*self._replica, *text])
        raise Aborted(details)


class LoraServe:
    """One replica: one engine, its adapter tiers, the shared store (see the module doc)."""

    async def __init__(self, settings: Mapping[str, Any]) -> None:  # type: ignore[misc]
        config = server_config(settings)
        metrics = Metrics(names=config.metrics_names)
        self._state = ServerState(config, Authenticator.from_file(config.api_keys), metrics)
        asyncio.get_running_loop().set_default_executor(serial_executor())  # see app._serve
        runtime = await in_passing_thread(build_runtime, config, metrics)
        await warm_up(runtime.engine)
        freeze_start_up_objects()  # as app._serve: full collections skip the model's objects
        self._state.runtime = runtime
        self._metrics_push = asyncio.create_task(push_forever(RegistryMirror(metrics.registry)))
        self._generation = GenerationServicer(self._state)
        self._adapters = AdapterServicer(self._state)
        self._info = ServerInfoServicer(self._state)
        replica = serve.get_replica_context().replica_id.unique_id
        self._replica = ((REPLICA_KEY, replica), (PID_KEY, str(os.getpid())))

        async def hold(model_id: str) -> str:
            """Ray's record that this replica serves `model_id` (the engine's tiers hold the
            weights; Ray forgetting one only changes where its next requests go)."""
            return model_id

        slots = config.engine.device_slots
        self._hold = serve.multiplexed(max_num_models_per_replica=slots)(hold)

    def __serve_build_asgi_app__(self) -> Starlette:
        """The OpenAI-compatible front Ray's HTTP proxy serves (called once, after `__init__`)."""
        app = OpenAIFront(self._state).app()
        app.add_middleware(RayHttpMiddleware, hold=self._hold, replica=self._replica)
        return app

    async def Generate(
        self, request: gpb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> gpb.GenerateResponse:
        context = await self._admit(
            grpc_context, GENERATION + "Generate", request.input.adapter.name
        )
        return await self._generation.Generate(request, context)

    async def GenerateStream(
        self, request: gpb.GenerateStreamRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[gpb.GenerateStreamResponse]:
        context = await self._admit(
            grpc_context, GENERATION + "GenerateStream", request.input.adapter.name
        )
        async for reply in self._generation.GenerateStream(request, context):
            yield reply

    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, grpc_context: RayServegRPCContext
    ) -> apb.ListAdaptersResponse:
        context = self._checked(grpc_context, ADAPTERS + "ListAdapters")
        return await self._adapters.ListAdapters(request, context)

    async def GetAdapter(
        self, request: apb.GetAdapterRequest, grpc_context: RayServegRPCContext
    ) -> apb.GetAdapterResponse:
        context = self._checked(grpc_context, ADAPTERS + "GetAdapter")
        return await self._adapters.GetAdapter(request, context)

    async def DeleteAdapter(
        self, request: apb.DeleteAdapterRequest, grpc_context: RayServegRPCContext
    ) -> apb.DeleteAdapterResponse:
        context = self._checked(grpc_context, ADAPTERS + "DeleteAdapter")
        return await self._adapters.DeleteAdapter(request, context)

    async def UploadAdapter(
        self,
        request_stream: AsyncIterator[apb.UploadAdapterRequest],
        grpc_context: RayServegRPCContext,
    ) -> apb.UploadAdapterResponse:
        context = self._checked(grpc_context, ADAPTERS + "UploadAdapter")
        return await self._adapters.UploadAdapter(request_stream, context)

    async def PrefetchAdapter(
        self, request: apb.PrefetchAdapterRequest, grpc_context: RayServegRPCContext
    ) -> apb.PrefetchAdapterResponse:
        context = await self._admit(grpc_context, ADAPTERS + "PrefetchAdapter", request.name)
        return await self._adapters.PrefetchAdapter(request, context)

    async def PinAdapter(
        self, request: apb.PinAdapterRequest, grpc_context: RayServegRPCContext
    ) -> apb.PinAdapterResponse:
        context = await self._admit(grpc_context, ADAPTERS + "PinAdapter", request.name)
        return await self._adapters.PinAdapter(request, context)

    async def GetServerInfo(
        self, request: spb.GetServerInfoRequest, grpc_context: RayServegRPCContext
    ) -> spb.GetServerInfoResponse:
        context = self._checked(grpc_context, "/loraserve.v1.ServerService/GetServerInfo")
        return await self._info.GetServerInfo(request, context)

    async def _admit(
        self, grpc_context: RayServegRPCContext, method: str, adapter: str
    ) -> RayContext:
        """The call's context for `method` on `adapter`, after the checks of `_checked`, once
        Ray has recorded that this replica serves the adapter its call was routed by."""
        context = self._checked(grpc_context, method)
        routed = serve.get_multiplexed_model_id()
        if routed and routed != adapter:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"multiplexed_model_id {routed[:64]!r} must equal the adapter's name "
                f"{adapter[:64]!r}: Ray routes on the one and the engine serves the other",
            )
        if routed:
            await self._hold(routed)
        return context

    def _checked(self, grpc_context: RayServegRPCContext, method: str) -> RayContext:
        """The call's context, after the API-key and scope checks of `api.auth`'s interceptor
        (Ray's proxy runs no interceptors)."""
        context = RayContext(grpc_context, self._replica)
        principal = self._state.auth.principal(context.invocation_metadata())
        if principal is None:
            refuse(grpc_context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        needed = REQUIRED_SCOPES.get(method, ("admin",))
        if not principal.scopes.intersection(needed):
            refuse(
                grpc_context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs scope {' or '.join(needed)}; this key lacks it",
            )
        return context


class RayHttpMiddleware:
    """What `LoraServe._admit` and `RayContext` do for gRPC calls, for the HTTP front's: a call
    Ray routed by an adapter (its `serve_multiplexed_model_id` header) records that this replica
    serves the adapter, and every response names the replica in its headers. The header only
    steers routing; the body's `model` picks the weights."""

    def __init__(
        self,
        app: ASGIApp,
        hold: Callable[[str], Awaitable[str]],
        replica: tuple[tuple[str, str], ...],
    ) -> None:
        self.app = app
        self.hold = hold
        self.headers = [(key.encode(), value.encode()) for key, value in replica]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if routed := serve.get_multiplexed_model_id():
            await self.hold(routed)

        async def send_naming_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_naming_replica)


def refuse(context: RayServegRPCContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.set_code(code)
    context.set_details(details)
    raise Aborted(details)


def server_config(settings: Mapping[str, Any]) -> ServerConfig:
    """The replica's configuration: `settings` (the server's setting names, as in a config
    file) over the `LORASERVE_*` environment, as `loraserve serve` merges them."""
    return load_config({}, file_values=settings)


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve.run`: `args` holds the server's settings and
    the deployment's `num_replicas`, `max_ongoing_requests`, `max_queued_requests`,
    `autoscaling_config`, `num_gpus` (default: 1 when the cluster has GPUs), `num_cpus` and the
    router's `affinity_wait_s` and `affinity_imbalance` (`ray_routing`)."""
    import ray

    not_settings = (*DEPLOYMENT_OPTIONS, *ACTOR_OPTIONS, *ROUTER_OPTIONS)
    settings = {k: v for k, v in args.items() if k not in not_settings}
    config = server_config(settings)  # a bad setting fails here, not in every replica
    for name, work in RAYS_OWN.items():
        if getattr(config, name) is not None:
            raise ValueError(f"{name}: {work} under Ray; leave the setting out")
    num_gpus = args.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU") else 0
    options: dict[str, Any] = {k: args[k] for k in DEPLOYMENT_OPTIONS if k in args}
    if "autoscaling_config" in args:
        options.pop("num_replicas", None)
        options["autoscaling_config"] = args["autoscaling_config"]
    options["ray_actor_options"] = {
        "num_gpus": num_gpus,
        "num_cpus": args.get("num_cpus", 1),
        # read by malloc as the replica's process starts, before Ray's threads (host_memory)
        "runtime_env": {"env_vars": ONE_ARENA_ENVIRONMENT},
    }
    options["request_router_config"] = {  # Ray's RequestRouterConfig
        "request_router_class": AdapterAffinityRouter,
        "request_router_kwargs": affinity(args),
    }
    deployment = serve.deployment(name="LoraServe", **options)(serve.ingress()(LoraServe))
    return deployment.bind(settings)


def affinity(args: Mapping[str, Any]) -> dict[str, float]:
    """The router's `Affinity` fields from `args`' `ROUTER_OPTIONS`, checked."""
    fields = {}
    if "affinity_wait_s" in args:
        fields["wait_s"] = number(args, "affinity_wait_s", 0, 600)
    if "affinity_imbalance" in args:
        fields["imbalance"] = int(number(args, "affinity_imbalance", 1, 1_000_000, whole=True))
    return fields


def number(args: Mapping[str, Any], name: str, low: int, high: int, whole: bool = False) -> float:
    """`args[name]`, refused unless a finite number in [low, high] (whole, when `whole`)."""
    value = args[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not low <= value <= high
        or (whole and value != int(value))
    ):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{name}: {value!r} is not {kind} in [{low}, {high}]")
    return value


def run(args: Mapping[str, Any], address: str | None, grpc_port: int, http: tuple[str, int]) -> int:
    """`loraserve ray-serve`: join the Ray cluster at `address` (None: start a local one),
    start Serve's proxies (gRPC on `grpc_port`, HTTP on `http`), run the application until
    interrupted, then shut Serve down."""
    import ray
    from ray.serve.config import gRPCOptions

    ray.init(address=address)
    serve.start(
        http_options={"host": http[0], "port": http[1]},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
