"""API keys, tenants and scopes, enforced by one interceptor on every method but health.

The keys file (`keys_file`: keys, tenants, scopes, quotas, schema-checked) maps each key to a
tenant and its scopes. Keys arrive as `authorization: Bearer <key>` metadata. A key is hashed
and compared in constant time against every configured hash; keys are never logged. `reload`
reads the file again (on SIGHUP): a good file replaces the table in one step, so a call sees
the old keys or the new ones, never a mix; a bad one raises and the old table stays. Without a
keys file the server runs in single-tenant development mode: every caller is tenant "default"
with every scope and no quota.

Knows nothing about what the methods do: only which scope each method needs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from loraserve.api.errors import abort
from loraserve.api.handlers import rewrapped
from loraserve.api.keys_file import SCOPES, KeyTable, Principal, read_keys_file
from loraserve.metrics import Metrics
from loraserve.types import DEFAULT_TENANT, UNLIMITED, TenantQuota

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
DEVELOPER = Principal(DEFAULT_TENANT, frozenset(SCOPES))


class Authenticator:
    """Who is calling: a Principal from the call's metadata, or None when unauthenticated.

    path: the keys file (None: development mode)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = path
        self._table: KeyTable | None = None if path is None else read_keys_file(path)

    @property
    def development_mode(self) -> bool:
        return self._table is None

    @classmethod
    def from_file(cls, path: str | Path | None) -> Authenticator:
        """Raises ValueError saying what is wrong with the file."""
        return cls(path)

    def reload(self) -> KeyTable:
        """Read the keys file again and use it from the next call; returns the new table.

        Raises ValueError (the table in use stays) when the file is unreadable or invalid, and
        in development mode."""
        if self.path is None:
            raise ValueError("no --api-keys file to reload: the server runs in development mode")
        table = read_keys_file(self.path)
        self._table = table
        return table

    def quota(self, tenant: str) -> TenantQuota:
        table = self._table
        return UNLIMITED if table is None else table.quota(tenant)

    def principal(self, metadata) -> Principal | None:
        table = self._table  # one read: a reload mid-call changes nothing for this call
        if table is None:
            return DEVELOPER
        header = dict(metadata or ()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for candidate, principal in table.principals.items():  # no early exit to time
            if hmac.compare_digest(candidate, digest):
                found = principal
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

    return rewrapped(handler, refuse_stream if handler.response_streaming else refuse)


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
