"""The synchronous client: one gRPC channel to a loraserve server, one method per RPC.

Arguments in, plain values (`types`) out, `errors` raised. Request and reply translation is
`messages`, deadlines, metadata and retries are `calls`, the upload stream is `upload`. Knows
nothing about the server's internals: only the loraserve.v1 contract and the health service.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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


class GenerationStream:
    """`TokenChunk`s then one `Finished`. `close()`, or leaving a `with` block, cancels the call
    on the server; iteration then stops."""

    def __init__(self, call: Any) -> None:
        # call: the grpc unary-stream call, an iterator of GenerateStreamResponse and a grpc.Call
        self._call = call
        self._done = False

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._done:
            raise StopIteration
        try:
            event = event_of(next(self._call))
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as error:
            self._done = True
            raise error_from_rpc(error) from error
        self._done = isinstance(event, Finished)
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """A blocking client. `timeout` is the default deadline of every call in seconds; `retries`
    is how often (at most 4) gRPC retries health, server_info, list and get on UNAVAILABLE,
    waiting `backoff` between tries. `credentials` (grpc.ssl_channel_credentials) connect
    over TLS, with a client certificate for mTLS; without them the channel is plaintext."""

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
            self._channel = grpc.insecure_channel(address, options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._server = server_pb2_grpc.ServerServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """One RPC with metadata and deadline (gRPC retries the idempotent ones: `calls`)."""
        settings = self.settings
        try:
            return method(request, timeout=settings.seconds(timeout), metadata=settings.metadata())
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    def generate(
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
        reply = self._call(self._generation.Generate, request, timeout)
        return result_of(reply)

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **option_fields: Any,
    ) -> GenerationStream:
        """The completion token by token; see `GenerationStream`. Errors raise while iterating."""
        message = generation_input(prompt, GenerateOptions.merged(options, option_fields))
        call = self._generation.GenerateStream(
            generation_pb2.GenerateStreamRequest(input=message),
            timeout=self.settings.seconds(timeout),
            metadata=self.settings.metadata(),
        )
        return GenerationStream(call)

    def server_info(self, timeout: float | None = None) -> dict[str, str | int | bool]:
        request = server_pb2.GetServerInfoRequest()
        reply = self._call(self._server.GetServerInfo, request, timeout)
        return server_info_of(reply)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The status name (SERVING, NOT_SERVING, ...) of the server ("") or one service."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._call(self._health.Check, request, timeout)
        return health_status_of(reply)

    def upload_adapter(
        self,
        directory: str | Path,
        name: str,
        version: str | None = None,
        progress: bool | None = None,
        timeout: float | None = None,
    ) -> Adapter:
        """Stream a PEFT directory (adapter_config.json + adapter_model.safetensors).

        Refuses a directory without both files before connecting. `progress` draws a bar on
        stderr; None draws it only when stderr is a terminal. `version` None lets the server
        assign the next one.
        """
        requests, bar = prepare_upload(directory, name, version, progress, sys.stderr)
        try:
            reply = self._call(self._adapters.UploadAdapter, requests, timeout)
        finally:
            if bar is not None:
                bar.close()
        return adapter_of(reply.adapter)

    def list_adapters_page(
        self, page_size: int = 100, page_token: str = "", timeout: float | None = None
    ) -> tuple[list[Adapter], str]:
        """One page of adapters and the next page's token ("" after the last page)."""
        request = adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        reply = self._call(self._adapters.ListAdapters, request, timeout)
        return [adapter_of(a) for a in reply.adapters], reply.next_page_token

    def list_adapters(self, page_size: int = 100, timeout: float | None = None) -> list[Adapter]:
        """Every adapter, walking all pages; `timeout` applies to each page."""
        adapters, token = self.list_adapters_page(page_size, "", timeout)
        while token:
            page, token = self.list_adapters_page(page_size, token, timeout)
            adapters.extend(page)
        return adapters

    def get_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> Adapter:
        """One version, the latest when `version` is None."""
        request = adapters_pb2.GetAdapterRequest(name=name, version=version or "")
        reply = self._call(self._adapters.GetAdapter, request, timeout)
        return adapter_of(reply.adapter)

    def delete_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> list[str]:
        """Delete one version, or every version when `version` is None; the versions deleted."""
        request = adapters_pb2.DeleteAdapterRequest(name=name, version=version or "")
        reply = self._call(self._adapters.DeleteAdapter, request, timeout)
        return list(reply.deleted_versions)

    def prefetch_adapter(
        self, name: str, version: str | None = None, timeout: float | None = None
    ) -> str:
        """Start loading into a device slot (admin scope); the residency now."""
        request = adapters_pb2.PrefetchAdapterRequest(name=name, version=version or "")
        reply = self._call(self._adapters.PrefetchAdapter, request, timeout)
        return residency_of(reply.residency)

    def pin_adapter(
        self,
        name: str,
        version: str | None = None,
        pinned: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Keep resident in its device slot, or release the pin (admin scope); pinned now."""
        request = adapters_pb2.PinAdapterRequest(name=name, version=version or "", pinned=pinned)
        reply = self._call(self._adapters.PinAdapter, request, timeout)
        return reply.pinned
