"""AdapterService: streamed upload, list, get, delete, prefetch and pin, scoped to the caller.

A translator over the adapter catalog: protobuf in, the caller's tenant (and its quota) and
plain values to the catalog, its answers back to protobuf, its errors through the one error
table. An upload streams into a staging directory as chunks arrive, its sizes and checksums are
checked against the header, then the catalog validates and publishes it atomically; anything
short of that leaves nothing behind, including an upload whose next message does not come
within the idle timeout. Every name resolves inside the caller's tenant, so another tenant's
adapter is NOT_FOUND exactly like a missing one.

Knows nothing about generation, batching or the disk layout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loraserve.adapters.catalog import AdapterCatalog, StoredAdapter
from loraserve.adapters.staging import upload_file_problems
from loraserve.api.auth import caller
from loraserve.api.errors import abort_with
from loraserve.api.state import ServerState
from loraserve.types import (
    AdapterExistsError,
    AdapterIncompatibleError,
    CapacityError,
    IdleUploadError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraServeError,
    QuotaExceededError,
    shown,
)
from loraserve_client.v1 import adapters_pb2 as pb
from loraserve_client.v1 import adapters_pb2_grpc

MAX_CHUNK_BYTES = 1 << 20
PREFETCH_WAIT_S = 30.0
RESIDENCY = {"disk": pb.RESIDENCY_DISK, "host": pb.RESIDENCY_HOST, "device": pb.RESIDENCY_DEVICE}
UPLOAD_RESULTS = (  # the metric's label for each way an upload is refused
    (CapacityError, "too_large"),
    (QuotaExceededError, "quota"),
    (AdapterExistsError, "exists"),
    (IdleUploadError, "idle"),
    (AdapterIncompatibleError, "incompatible"),
)
Message = TypeVar("Message")


def _header_problems(header: pb.UploadHeader) -> list[str]:
    problems = [
        f"header.files: {p}" for p in upload_file_problems([f.filename for f in header.files])
    ]
    for f in header.files:
        if len(f.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in f.sha256):
            problems.append(f"header.files[{shown(f.filename)}].sha256 must be 64 hex characters")
        if f.size_bytes == 0:
            problems.append(f"header.files[{shown(f.filename)}].size_bytes must be > 0")
    return problems


def _upload_result(error: LoraServeError) -> str:
    return next((label for cls, label in UPLOAD_RESULTS if isinstance(error, cls)), "invalid")


async def _arriving(messages: AsyncIterator[Message], idle_s: float) -> AsyncIterator[Message]:
    """`messages`, ending with IdleUploadError when the next one takes more than `idle_s`."""
    iterator = aiter(messages)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise IdleUploadError(
                f"no upload message for {idle_s:g} s (upload_idle_timeout_seconds): the upload "
                "was aborted and nothing was kept; send the chunks without pausing"
            ) from None
        yield message


def _message(adapter: StoredAdapter) -> pb.Adapter:
    manifest = adapter.manifest
    created = Timestamp()
    created.FromDatetime(datetime.fromisoformat(manifest.created_at))
    return pb.Adapter(
        tenant=manifest.tenant,
        name=manifest.name,
        version=manifest.version,
        rank=manifest.rank,
        target_modules=manifest.target_modules,
        lora_alpha=manifest.lora_alpha,
        use_rslora=manifest.use_rslora,
        dtype=manifest.dtype,
        create_time=created,
        files=[
            pb.AdapterFile(filename=name, sha256=f["sha256"], size_bytes=f["size"])
            for name, f in sorted(manifest.files.items())
        ],
        shared=adapter.shared,
        pinned=adapter.status.pinned,
        residency=RESIDENCY[adapter.status.residency],
    )


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context
    ) -> pb.UploadAdapterResponse:
        catalog, tenant = await self._caller(context)
        config = self.state.config
        limit = config.max_upload_bytes
        messages = _arriving(request_iterator, config.upload_idle_timeout_seconds)
        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidRequestError("the first upload message must be the header")
            header = first.header
            if problems := _header_problems(header):
                raise InvalidAdapterError("upload refused:", problems)
            sizes = {f.filename: f.size_bytes for f in header.files}
            declared = sum(sizes.values())
            if declared > limit:
                raise CapacityError(
                    f"upload of {declared} bytes exceeds the server's limit of {limit} bytes"
                )
            received = dict.fromkeys(sizes, 0)
            expected = {f.filename: f.sha256 for f in header.files}
            quota = self.state.auth.quota(tenant)
            with catalog.staging(
                tenant, header.name, header.version or None, expected, quota, declared
            ) as upload:
                async for message in messages:
                    chunk = message.chunk
                    if message.WhichOneof("part") != "chunk" or chunk.filename not in sizes:
                        raise InvalidRequestError(
                            "after the header, send only chunks of the files the header lists"
                        )
                    if len(chunk.data) > MAX_CHUNK_BYTES:
                        raise InvalidRequestError(f"chunks must be at most {MAX_CHUNK_BYTES} bytes")
                    received[chunk.filename] += len(chunk.data)
                    if received[chunk.filename] > sizes[chunk.filename]:
                        raise InvalidRequestError(
                            f"{chunk.filename}: more bytes than the {sizes[chunk.filename]} "
                            "the header declared"
                        )
                    upload.write(chunk.filename, chunk.data)
                short = [
                    f"{n}: got {received[n]} of {sizes[n]} bytes"
                    for n in sizes
                    if received[n] != sizes[n]
                ]
                if short:
                    raise InvalidRequestError("truncated upload: " + "; ".join(short))
                manifest = await asyncio.to_thread(upload.commit)
        except LoraServeError as error:
            self.state.metrics.adapter_uploads.labels(_upload_result(error)).inc()
            await abort_with(context, error)
        metrics = self.state.metrics
        metrics.adapter_uploads.labels("published").inc()
        metrics.adapter_upload_bytes.inc(sum(f["size"] for f in manifest.files.values()))
        return pb.UploadAdapterResponse(adapter=_message(catalog.describe(manifest)))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context
    ) -> pb.ListAdaptersResponse:
        catalog, tenant = await self._caller(context)
        try:
            page, token = catalog.page(tenant, request.page_size, request.page_token)
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.ListAdaptersResponse(adapters=[_message(a) for a in page], next_page_token=token)

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.GetAdapterResponse:
        catalog, tenant = await self._caller(context)
        try:
            adapter = catalog.get(tenant, request.name, request.version or None)
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.GetAdapterResponse(adapter=_message(adapter))

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context
    ) -> pb.DeleteAdapterResponse:
        catalog, tenant = await self._caller(context)
        try:
            deleted = catalog.delete(tenant, request.name, request.version or None)
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.DeleteAdapterResponse(deleted_versions=deleted)

    async def PrefetchAdapter(
        self, request: pb.PrefetchAdapterRequest, context
    ) -> pb.PrefetchAdapterResponse:
        catalog, tenant = await self._caller(context)
        wait = min(PREFETCH_WAIT_S, context.time_remaining() or PREFETCH_WAIT_S)
        try:
            residency = await asyncio.to_thread(
                catalog.prefetch, tenant, request.name, request.version or None, wait
            )
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.PrefetchAdapterResponse(residency=RESIDENCY[residency])

    async def PinAdapter(self, request: pb.PinAdapterRequest, context) -> pb.PinAdapterResponse:
        catalog, tenant = await self._caller(context)
        try:
            pinned = catalog.pin(tenant, request.name, request.version or None, request.pinned)
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.PinAdapterResponse(pinned=pinned)

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[AdapterCatalog, str]:
        """The catalog and the caller's tenant, once start-up finished (until then the call
        ends UNAVAILABLE)."""
        runtime = await self.state.runtime_or_abort(context)
        return runtime.adapters, (await caller(context, self.state.auth)).tenant
