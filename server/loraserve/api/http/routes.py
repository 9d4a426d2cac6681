"""The OpenAI-compatible endpoints: `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /v1/models`, and `GET /health` for HTTP probes.

Each call goes the way a gRPC call does, with the same parts: the `Authenticator` (an
`Authorization: Bearer <key>` header, the scope the matching gRPC method needs), the runtime
check (503 while loading or draining), the tenant's `max_requests_in_flight` place and the drain
counter in `CallTracker`, the domain request handed to the engine, whose intake validates it as
it validates gRPC's. The body is read up to `max_message_bytes` (413 past it) and checked
against a closed schema before it is translated. A stream (`"stream": true`) is server-sent
events ending in `data: [DONE]`; a client that disconnects cancels its request in the engine, as
a cancelled gRPC call does. Every call's outcome is counted in `loraserve_grpc_responses` under
its route, with the gRPC status it maps to.

Knows nothing about the model or batching; runs on the event loop the gRPC server uses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import grpc
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraserve.adapters.catalog import AdapterCatalog
from loraserve.adapters.store import MAX_PAGE_SIZE
from loraserve.api.auth import ADAPTERS, REQUIRED_SCOPES
from loraserve.api.http.errors import BODY_TOO_LARGE, HttpError, log_unexpected
from loraserve.api.http.events import Events, EventStream, Outcome, stream
from loraserve.api.http.schemas import ChatBody, CompletionBody
from loraserve.api.http.translate import Reply, chat_request, completion_request
from loraserve.api.keys_file import Principal
from loraserve.api.state import Runtime, ServerState
from loraserve.types import FinalEvent, GenerateRequest, TokenEvent

GENERATE_SCOPES = REQUIRED_SCOPES["/loraserve.v1.GenerationService/Generate"]
LIST_SCOPES = REQUIRED_SCOPES[ADAPTERS + "ListAdapters"]
Body = TypeVar("Body", CompletionBody, ChatBody)


class OpenAIFront:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _route_error})

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, CompletionBody, completion_request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, ChatBody, chat_request, chat=True)

    async def models(self, request: Request) -> Response:
        route = "GET /v1/models"
        try:
            with self.state.calls.call():
                principal = self._principal(request, LIST_SCOPES)
                runtime = self._runtime()
                adapters = await asyncio.to_thread(_adapter_models, runtime.adapters, principal)
        except Exception as error:
            return self._refuse(route, error)
        base = self.state.config.base_model_id
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "loraserve"}]
        data += [dict(model, parent=base, root=base) for model in adapters]
        self._count(route, grpc.StatusCode.OK)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        """What grpc.health.v1 says for the server: 200 SERVING, else 503."""
        try:
            self._runtime()
        except HttpError as refusal:
            return refusal.response()
        if not self.state.serving:
            return HttpError(grpc.StatusCode.UNAVAILABLE, "not serving yet").response()
        return JSONResponse({"status": "SERVING"})

    async def _generation(
        self,
        request: Request,
        schema: type[Body],
        translate: Callable[[Body, str, str, int], GenerateRequest],
        chat: bool,
    ) -> Response:
        route = f"POST {request.url.path}"
        held = contextlib.ExitStack()
        try:
            held.enter_context(self.state.calls.call())
            principal = self._principal(request, GENERATE_SCOPES)
            runtime = self._runtime()
            body = await self._body(request, schema)
            tenant = principal.tenant
            limit = self.state.auth.quota(tenant).max_requests_in_flight
            held.enter_context(self.state.calls.generation(tenant, limit))
            config = self.state.config
            domain = translate(body, tenant, config.base_model_id, config.default_max_new_tokens)
            events = await runtime.engine.generate(domain)
        except BaseException as error:
            held.close()
            if not isinstance(error, Exception):
                raise
            return self._refuse(route, error)
        reply = Reply(body.model, chat, body.return_token_ids)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            outcome = Outcome()

            async def ended() -> None:
                await events.aclose()
                held.close()
                self._count(route, outcome.code)

            return EventStream(stream(events, reply, usage, outcome), ended)
        with held:
            return await self._whole(route, request, events, reply)

    async def _whole(self, route: str, request: Request, events: Events, reply: Reply) -> Response:
        """Gather the reply; a client that disconnects first cancels the generation."""
        gathering = asyncio.ensure_future(_gather(events, reply))
        leaving = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            if not gathering.done():
                gathering.cancel()
                self._count(route, grpc.StatusCode.CANCELLED)
        if not gathering.done():
            with contextlib.suppress(asyncio.CancelledError):
                await gathering
            return Response(status_code=499)
        try:
            final = gathering.result()
        except Exception as error:
            return self._refuse(route, error)
        self._count(route, grpc.StatusCode.OK)
        return JSONResponse(reply.whole(final))

    def _principal(self, request: Request, needed: tuple[str, ...]) -> Principal:
        header = request.headers.get("authorization", "")
        principal = self.state.auth.principal([("authorization", header)])
        if principal is None:
            self.state.metrics.requests_rejected.labels("auth").inc()
            raise HttpError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key: send the header 'Authorization: Bearer <key>'",
            )
        if not principal.scopes.intersection(needed):
            self.state.metrics.requests_rejected.labels("auth").inc()
            raise HttpError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{request.url.path} needs scope {' or '.join(needed)}; this key lacks it",
            )
        return principal

    def _runtime(self) -> Runtime:
        """The running runtime, or 503 saying why it is not there (as gRPC's UNAVAILABLE)."""
        unavailable = grpc.StatusCode.UNAVAILABLE
        state = self.state
        if state.draining:
            raise HttpError(unavailable, "the server is shutting down")
        if state.runtime is None:
            raise HttpError(unavailable, state.startup_error or "the model is still loading")
        if not state.runtime.engine.alive:
            raise HttpError(unavailable, "the engine stopped; see server log")
        return state.runtime

    async def _body(self, request: Request, schema: type[Body]) -> Body:
        """The body, read up to the message limit, checked against `schema`."""
        limit = self.state.config.max_message_bytes
        too_large = HttpError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is over this server's limit of {limit} bytes",
            status=BODY_TOO_LARGE,
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            return schema.model_validate_json(b"".join(chunks))
        except ValidationError as error:
            raise HttpError.invalid_body(error) from None

    def _refuse(self, route: str, error: Exception) -> Response:
        refusal = HttpError.of(error)
        log_unexpected(error, refusal)
        self._count(route, refusal.code)
        return refusal.response()

    def _count(self, route: str, code: grpc.StatusCode) -> None:
        self.state.metrics.responses.labels(route, code.name).inc()


async def _gather(events: Events, reply: Reply) -> FinalEvent:
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TokenEvent):
                reply.tokens.append(event)
            else:
                return event
    raise AssertionError("the engine ended a request without a final event")


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _adapter_models(catalog: AdapterCatalog, principal: Principal) -> list[dict]:
    """The caller's adapters (its own, then shared), one entry per name: OpenAI's model list."""
    seen: dict[str, dict] = {}
    token = ""
    while True:
        page, token = catalog.page(principal.tenant, MAX_PAGE_SIZE, token)
        for adapter in page:
            manifest = adapter.manifest
            if manifest.name in seen:
                continue
            created = 0
            with contextlib.suppress(ValueError):
                created = int(datetime.fromisoformat(manifest.created_at).timestamp())
            owner = "shared" if adapter.shared else principal.tenant
            seen[manifest.name] = {
                "id": manifest.name,
                "object": "model",
                "created": created,
                "owned_by": owner,
            }
        if not token:
            return list(seen.values())


async def _route_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    status = error.status_code if isinstance(error, HTTPException) else 500
    code = grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.INVALID_ARGUMENT
    message = f"{request.method} {request.url.path}: {status}"
    return HttpError(code, message, status=status).response()
