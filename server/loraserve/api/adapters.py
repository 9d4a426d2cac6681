"""AdapterService: streamed upload, list, get, delete, prefetch and pin, scoped to the caller.

A translator over the adapter store (disk) and the adapter manager (host and device tiers).
An upload streams into a staging directory as chunks arrive, its sizes and checksums are
checked against the header, then the store validates and publishes it atomically; anything
short of that leaves nothing behind. Every name resolves inside the caller's tenant, so another
tenant's adapter is NOT_FOUND exactly like a missing one.

Knows nothing about generation or batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loraserve.adapters import peft_format
from loraserve.adapters.manager import manifest_key
from loraserve.adapters.manifest import AdapterManifest
from loraserve.api.auth import caller
from loraserve.api.errors import abort_with
from loraserve.api.state import ServerState
from loraserve.types import (
    AdapterIncompatibleError,
    CapacityError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraServeError,
)
from loraserve.v1 import adapters_pb2 as pb
from loraserve.v1 import adapters_pb2_grpc

MAX_CHUNK_BYTES = 1 << 20
PREFETCH_WAIT_S = 30.0
UPLOAD_FILES = (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE)
RESIDENCY = {"disk": pb.RESIDENCY_DISK, "host": pb.RESIDENCY_HOST, "device": pb.RESIDENCY_DEVICE}


def _header_problems(header: pb.UploadHeader) -> list[str]:
    problems = []
    declared = {f.filename for f in header.files}
    pickles = declared & set(peft_format.PICKLE_FILES)
    if pickles:
        problems.append(f"{', '.join(sorted(pickles))}: {peft_format.PICKLE_ADVICE}")
    if sorted(declared) != sorted(UPLOAD_FILES) or len(header.files) != len(UPLOAD_FILES):
        problems.append(f"header.files must list exactly {' and '.join(UPLOAD_FILES)}")
    for f in header.files:
        if len(f.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in f.sha256):
            problems.append(f"header.files[{f.filename!r}].sha256 must be 64 hex characters")
        if f.size_bytes == 0:
            problems.append(f"header.files[{f.filename!r}].size_bytes must be > 0")
    return problems


def _upload_result(error: LoraServeError) -> str:
    if isinstance(error, CapacityError):
        return "too_large"
    if isinstance(error, AdapterIncompatibleError):
        return "incompatible"
    return "invalid"


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _message(self, manifest: AdapterManifest) -> pb.Adapter:
        manager = self.state.engine.core.adapters
        key = manifest_key(manifest)
        created = Timestamp()
        created.FromDatetime(datetime.fromisoformat(manifest.created_at))
        slot = manager.table.find(key)
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
            pinned=slot is not None and slot.pinned,
            residency=RESIDENCY[manager.residency(key)],
        )

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context
    ) -> pb.UploadAdapterResponse:
        tenant = await self._tenant(context)
        store = self.state.store
        limit = self.state.config.max_upload_bytes
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidRequestError("the first upload message must be the header")
            header = first.header
            if problems := _header_problems(header):
                raise InvalidAdapterError("upload refused:", problems)
            sizes = {f.filename: f.size_bytes for f in header.files}
            if sum(sizes.values()) > limit:
                raise CapacityError(
                    f"upload of {sum(sizes.values())} bytes exceeds the server's limit of "
                    f"{limit} bytes"
                )
            received = dict.fromkeys(sizes, 0)
            expected = {f.filename: f.sha256 for f in header.files}
            with store.staging(tenant, header.name, header.version or None, expected) as upload:
                async for message in request_iterator:
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
        return pb.UploadAdapterResponse(adapter=self._message(manifest))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context
    ) -> pb.ListAdaptersResponse:
        tenant = await self._tenant(context)
        try:
            page, token = self.state.store.list_adapters(
                tenant, request.page_size, request.page_token
            )
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.ListAdaptersResponse(
            adapters=[self._message(m) for m in page], next_page_token=token
        )

    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.GetAdapterResponse:
        tenant = await self._tenant(context)
        try:
            store = self.state.store
            manifest = store.manifest(store.resolve(tenant, request.name, request.version or None))
        except LoraServeError as error:
            await abort_with(context, error)
        return pb.GetAdapterResponse(adapter=self._message(manifest))

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context
    ) -> pb.DeleteAdapterResponse:
        tenant = await self._tenant(context)
        store, manager = self.state.store, self.state.engine.core.adapters
        try:
            if request.version:
                doomed = [store.manifest(store.resolve(tenant, request.name, request.version))]
            else:
                doomed = store.versions(tenant, request.name)
            keys = [manifest_key(m) for m in doomed]
            store.delete(tenant, request.name, request.version or None)
        except LoraServeError as error:
            await abort_with(context, error)
        for key in keys:  # in-flight requests keep their slot; new ones can no longer reach it
            manager.forget(key)
        return pb.DeleteAdapterResponse(deleted_versions=[m.version for m in doomed])

    async def PrefetchAdapter(
        self, request: pb.PrefetchAdapterRequest, context
    ) -> pb.PrefetchAdapterResponse:
        manager, key = await self._stored_key(context, request.name, request.version)
        if not manager.prefetch(key):
            manager.warm_host(key)
        wait = min(PREFETCH_WAIT_S, context.time_remaining() or PREFETCH_WAIT_S)
        await asyncio.to_thread(manager.wait_for_loads, wait)  # report where it got to
        return pb.PrefetchAdapterResponse(residency=RESIDENCY[manager.residency(key)])

    async def PinAdapter(self, request: pb.PinAdapterRequest, context) -> pb.PinAdapterResponse:
        manager, key = await self._stored_key(context, request.name, request.version)
        pinned = manager.pin(key, request.pinned)
        if request.pinned and not pinned:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no device slot is free to pin this adapter into; unpin another or retry",
            )
        return pb.PinAdapterResponse(pinned=pinned)

    async def _tenant(self, context) -> str:
        """The caller's tenant, once the engine is up (until then the call ends UNAVAILABLE)."""
        await self.state.engine_or_abort(context)
        return (await caller(context, self.state.auth)).tenant

    async def _stored_key(self, context, name: str, version: str):
        """The manager and the cache key of the caller's stored adapter `name`."""
        tenant = await self._tenant(context)
        manager = self.state.engine.core.adapters
        try:
            key = manager.store_key(self.state.store.resolve(tenant, name, version or None))
            manager.raise_if_failed(key)
        except LoraServeError as error:
            await abort_with(context, error)
        return manager, key
