"""ServerService: what this server serves and its limits, for clients and gateways.

Knows nothing about generation; reads the config and the facts about the loaded model.
"""

from __future__ import annotations

import grpc

import loraserve
from loraserve.api.state import ServerState
from loraserve_client.v1 import server_pb2 as pb
from loraserve_client.v1 import server_pb2_grpc


class ServerInfoServicer(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        model = (await self.state.runtime_or_abort(context)).model
        engine_config = self.state.config.engine
        return pb.GetServerInfoResponse(
            base_model=self.state.config.model_name,
            quantization=model.quantization,
            compute_dtype=engine_config.compute_dtype,
            device=model.device,
            max_rank=engine_config.max_rank,
            device_slots=engine_config.device_slots,
            max_context=model.max_context,
            max_batch_size=engine_config.max_batch_size,
            default_max_new_tokens=self.state.config.default_max_new_tokens,
            version=loraserve.__version__,
            output_projection=model.output_projection,
            prefix_caching=engine_config.prefix_caching,
            batch_invariant=engine_config.batch_invariant,
            kv_cache_dtype=model.kv_cache_dtype,
        )
