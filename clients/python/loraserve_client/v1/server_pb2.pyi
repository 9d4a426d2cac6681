from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("base_model", "quantization", "compute_dtype", "device", "max_rank", "device_slots", "max_context", "max_batch_size", "default_max_new_tokens", "version", "output_projection", "prefix_caching", "batch_invariant", "kv_cache_dtype")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PROJECTION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    quantization: str
    compute_dtype: str
    device: str
    max_rank: int
    device_slots: int
    max_context: int
    max_batch_size: int
    default_max_new_tokens: int
    version: str
    output_projection: str
    prefix_caching: bool
    batch_invariant: bool
    kv_cache_dtype: str
    def __init__(self, base_model: _Optional[str] = ..., quantization: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_rank: _Optional[int] = ..., device_slots: _Optional[int] = ..., max_context: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., version: _Optional[str] = ..., output_projection: _Optional[str] = ..., prefix_caching: _Optional[bool] = ..., batch_invariant: _Optional[bool] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...
