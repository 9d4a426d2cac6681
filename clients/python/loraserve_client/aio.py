"""The asyncio client: the same methods as `Client`, as coroutines over a grpc.aio channel.

Create and use it inside one running event loop. `generate_stream` returns an async iterator
at once (no await). Translation is `messages`, deadlines and retries `calls`, the upload stream
`upload`; file reading and hashing run in worker threads. Knows nothing about the server's
internals.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve_client.calls import DEFAULT_BACKOFF, Backoff, CallSettings
from loraserve_client.errors import error_from_rpc
from loraserve_client.messages import (
    adapter_of,
    event_of,
    generation_input,
    health_status_of,
    residency_of,
    result_of,
    server_info_of,
)
from loraserve_client.types import (
    Adapter,
    Finished,
    GenerateOptions,
    GenerateResult,
    StreamEvent,
)
from loraserve_client.upload import prepare_upload
from loraserve_client.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
)

T = TypeVar("T")


async def _in_threads(items: Iterator[T]) -> AsyncIterator[T]:
    """Each `next(items)` in a worker thread, so file reads never block the event loop."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield cast(T, item)


class AsyncGenerationStream:
    """`TokenChunk`s then one `Finished`. `aclose()`, or leaving an `async with` block, cancels
    the call on the server; iteration then stops."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._done = False

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            self._done = True
            raise error_from_rpc(error) from error
        if message is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        event = event_of(message)
        self._done = isinstance(event, Finished)
        return event

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncClient:
    """A grpc.aio client; arguments, results and errors as for `Client`."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        *,
        backoff: Backoff = DEFAULT_BACKOFF,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.settings = CallSettings(api_key, timeout, retries, backoff)
        options = self.settings.channel_options()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._server = server_pb2_grpc.ServerServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """One RPC with metadata and deadline (gRPC retries the idempotent ones: `calls`)."""
        settings = self.settings
        try:
            return await method(
                request, timeout=settings.seconds(timeout), metadata=settings.metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    async def generate(
        self,
        prompt: str | Sequence[int],
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **option_fields: Any,
    ) -> GenerateResult:
        """The whole completion at once. `options`, or its fields as keywords
        (`adapter="sql", max_new_tokens=32`), which override `options`."""
        message = generation_input(prompt, GenerateOptions.merged(options, option_fields))
        request = generation_pb2.GenerateRequest(input=message)
        reply = await self._call(self._generation.Generate, request, timeout)
        return result_of(reply)

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **option_fields: Any,
    ) -> AsyncGenerationStream:
        """The completion token by token; see `AsyncGenerationStream`. Not a coroutine."""
        message = generation_input(prompt, GenerateOptions.merged(options, option_fields))
        call = self._generation.GenerateStream(
            generation_pb2.GenerateStreamRequest(input=message),
            timeout=self.settings.seconds(timeout),
            metadata=self.settings.metadata(),
        )
        return AsyncGenerationStream(call)

    async def server_info(self, timeout: float | None = None) -> dict[str, str | int | bool]:
        request = server_pb2.GetServerInfoRequest()
        reply = await self._call(self._server.GetServerInfo, request, timeout)
        return server_info_of(reply)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The status name (SERVING, NOT_SERVING, ...) of the server ("") or one service."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._call(self._health.Check, request, timeout)
        return health_status_of(reply)

    async def upload_adapter(
        self,
        directory: str | Path,
        name: str,
        version: str | None = None,
        progress: bool | None = None,
        timeout: float | None = None,
    ) -> Adapter:
        """As `Client.upload_adapter`; reading and hashing the files run in worker threads."""
        requests, bar = await asyncio.to_thread(
            prepare_upload, directory, name, version, progress, sys.stderr
        )
        try:
            method = self._adapters.UploadAdapter
            reply = await self._call(method, _in_threads(requests), timeout)
        finally:
            if bar is not None:
                bar.close()
        return adapter_of(reply.adapter)

    async def list_adapters_page(
        self, page_size: int = 100, page_token: str = "", timeout: float | None = None
    ) -> tuple[list[Adapter], str]:
        """One page of adapters and the next page's token ("" after the last page)."""
        request = adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        reply = await self._call(self._adapters.ListAdapters, request, timeout)
        return [adapter_of(a) for a in reply.adapters], reply.next_page_token

    async def list_adapters(
        self, page_size: int = 100, timeout: float | None = None
    ) -> list[Adapter]:
        """Every adapter, walking all pages; `timeout` applies to each page."""
        adapters, token = await self.list_adapters_page(page_size, "", timeout)
        while token:
            page, token = await self.list_adapters_page(page_size, token, timeout)
            adapters.extend(page)
        return adapters

    async def get_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> Adapter:
        """One version, the latest when `version` is None."""
        request = adapters_pb2.GetAdapterRequest(name=name, version=version or "")
        reply = await self._call(self._adapters.GetAdapter, request, timeout)
        return adapter_of(reply.adapter)

    async def delete_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> list[str]:
        """Delete one version, or every version when `version` is None; the versions deleted."""
        request = adapters_pb2.DeleteAdapterRequest(name=name, version=version or "")
        reply = await self._call(self._adapters.DeleteAdapter, request, timeout)
        return list(reply.deleted_versions)

    async def prefetch_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> str:
        """Start loading into a device slot (admin scope); the residency now."""
        request = adapters_pb2.PrefetchAdapterRequest(name=name, version=version or "")
        reply = await self._call(self._adapters.PrefetchAdapter, request, timeout)
        return residency_of(reply.residency)

    async def pin_adapter(
        self,
        name: str,
        version: str | None = None,
        pinned: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Keep resident in its device slot, or release the pin (admin scope); pinned now."""
        request = adapters_pb2.PinAdapterRequest(name=name, version=version or "", pinned=pinned)
        reply = await self._call(self._adapters.PinAdapter, request, timeout)
        return reply.pinned
