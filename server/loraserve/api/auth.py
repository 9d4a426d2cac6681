"""API keys, tenants and scopes, enforced by one interceptor on every method but health.

The keys file (JSON) maps each key to a tenant and its scopes:

    {"keys": [{"key_sha256": "<hex>", "tenant": "acme", "scopes": ["generate"]},
              {"key": "plain-text-key", "tenant": "ops", "scopes": ["generate", "admin"]}]}

Keys arrive as `authorization: Bearer <key>` metadata. A key is hashed and compared in constant
time against every configured hash; keys are never logged. Without a keys file the server runs
in single-tenant development mode: every caller is tenant "default" with every scope.

Knows nothing about what the methods do: only which scope each method needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraserve.api.errors import abort
from loraserve.metrics import Metrics
from loraserve.types import DEFAULT_TENANT

SCOPES = ("generate", "adapters:write", "admin")
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADAPTERS = "/loraserve.v1.AdapterService/"
# Method -> scopes of which the caller needs any one.
REQUIRED_SCOPES = {
    "/loraserve.v1.GenerationService/Generate": ("generate",),
    "/loraserve.v1.GenerationService/GenerateStream": ("generate",),
    "/loraserve.v1.ServerService/GetServerInfo": SCOPES,
    ADAPTERS + "UploadAdapter": ("adapters:write",),
    ADAPTERS + "DeleteAdapter": ("adapters:write",),
    ADAPTERS + "ListAdapters": SCOPES,
    ADAPTERS + "GetAdapter": SCOPES,
    ADAPTERS + "PrefetchAdapter": ("admin",),
    ADAPTERS + "PinAdapter": ("admin",),
}


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


class Authenticator:
    """Who is calling: a Principal from the call's metadata, or None when unauthenticated."""

    def __init__(self, keys: list[_Key] | None) -> None:
        self._keys = keys  # None: development mode

    @property
    def development_mode(self) -> bool:
        return self._keys is None

    @classmethod
    def from_file(cls, path: str | Path | None) -> Authenticator:
        if path is None:
            return cls(None)
        try:
            entries = json.loads(Path(path).read_text())["keys"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"API keys file {path}: cannot read a {{'keys': [...]}} object: {e}"
            ) from e
        keys = []
        for i, entry in enumerate(entries):
            scopes = frozenset(entry.get("scopes", ()))
            if unknown := scopes - set(SCOPES):
                raise ValueError(f"API keys file {path}: entry {i} has unknown scopes {unknown}")
            if "key_sha256" in entry:
                digest = bytes.fromhex(entry["key_sha256"])
            elif "key" in entry:
                digest = hashlib.sha256(entry["key"].encode()).digest()
            else:
                raise ValueError(f"API keys file {path}: entry {i} needs key or key_sha256")
            if not entry.get("tenant"):
                raise ValueError(f"API keys file {path}: entry {i} needs a tenant")
            keys.append(_Key(digest, Principal(entry["tenant"], scopes)))
        return cls(keys)

    def principal(self, metadata) -> Principal | None:
        if self._keys is None:
            return Principal(DEFAULT_TENANT, frozenset(SCOPES))
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for candidate in self._keys:  # compare with every key: no early exit to time
            if hmac.compare_digest(candidate.digest, digest):
                found = candidate.principal
        return found


async def caller(context: grpc.aio.ServicerContext, auth: Authenticator) -> Principal:
    """The authenticated caller of a servicer method (the interceptor already checked it)."""
    principal = auth.principal(context.invocation_metadata())
    if principal is None:
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
    return principal


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same streaming kind as `handler` that ends the call with `code`."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # makes this an async generator, as a server-streaming handler must be

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    streaming = (handler.request_streaming, handler.response_streaming)
    behaviour = refuse_stream if handler.response_streaming else refuse
    return kinds[streaming](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, metrics: Metrics) -> None:
        self.auth = auth
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        principal = self.auth.principal(details.invocation_metadata)
        if principal is None:
            self.metrics.requests_rejected.labels("auth").inc()
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key: send 'authorization: Bearer <key>' metadata",
            )
        needed = REQUIRED_SCOPES.get(details.method, ("admin",))
        if not principal.scopes.intersection(needed):
            self.metrics.requests_rejected.labels("auth").inc()
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{details.method} needs scope {' or '.join(needed)}; this key lacks it",
            )
        return handler
