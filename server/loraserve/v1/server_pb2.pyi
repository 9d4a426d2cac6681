from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("base_model", "compute_dtype", "default_max_new_tokens", "device", "device_slots", "max_batch_size", "max_context", "max_rank", "quantization", "version")
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
    def __init__(self, base_model: str | None = ..., quantization: str | None = ..., compute_dtype: str | None = ..., device: str | None = ..., max_rank: int | None = ..., device_slots: int | None = ..., max_context: int | None = ..., max_batch_size: int | None = ..., default_max_new_tokens: int | None = ..., version: str | None = ...) -> None: ...
