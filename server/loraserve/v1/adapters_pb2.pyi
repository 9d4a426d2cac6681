import datetime
from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_DISK: _ClassVar[Residency]
    RESIDENCY_HOST: _ClassVar[Residency]
    RESIDENCY_DEVICE: _ClassVar[Residency]
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_DISK: Residency
RESIDENCY_HOST: Residency
RESIDENCY_DEVICE: Residency

class AdapterFile(_message.Message):
    __slots__ = ("filename", "sha256", "size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    sha256: str
    size_bytes: int
    def __init__(self, filename: str | None = ..., sha256: str | None = ..., size_bytes: int | None = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("create_time", "dtype", "files", "lora_alpha", "name", "pinned", "rank", "residency", "shared", "target_modules", "tenant", "use_rslora", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    version: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    lora_alpha: float
    use_rslora: bool
    dtype: str
    create_time: _timestamp_pb2.Timestamp
    files: _containers.RepeatedCompositeFieldContainer[AdapterFile]
    shared: bool
    pinned: bool
    residency: Residency
    def __init__(self, tenant: str | None = ..., name: str | None = ..., version: str | None = ..., rank: int | None = ..., target_modules: _Iterable[str] | None = ..., lora_alpha: float | None = ..., use_rslora: bool | None = ..., dtype: str | None = ..., create_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ..., files: _Iterable[AdapterFile | _Mapping] | None = ..., shared: bool | None = ..., pinned: bool | None = ..., residency: Residency | str | None = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("files", "name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    files: _containers.RepeatedCompositeFieldContainer[AdapterFile]
    def __init__(self, name: str | None = ..., version: str | None = ..., files: _Iterable[AdapterFile | _Mapping] | None = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "filename")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    filename: str
    data: bytes
    def __init__(self, filename: str | None = ..., data: bytes | None = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("chunk", "header")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: FileChunk
    def __init__(self, header: UploadHeader | _Mapping | None = ..., chunk: FileChunk | _Mapping | None = ...) -> None: ...

class UploadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: Adapter | _Mapping | None = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: int | None = ..., page_token: str | None = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Iterable[Adapter | _Mapping] | None = ..., next_page_token: str | None = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: str | None = ..., version: str | None = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: Adapter | _Mapping | None = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: str | None = ..., version: str | None = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted_versions",)
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_versions: _Iterable[str] | None = ...) -> None: ...

class PrefetchAdapterRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: str | None = ..., version: str | None = ...) -> None: ...

class PrefetchAdapterResponse(_message.Message):
    __slots__ = ("residency",)
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    residency: Residency
    def __init__(self, residency: Residency | str | None = ...) -> None: ...

class PinAdapterRequest(_message.Message):
    __slots__ = ("name", "pinned", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    pinned: bool
    def __init__(self, name: str | None = ..., version: str | None = ..., pinned: bool | None = ...) -> None: ...

class PinAdapterResponse(_message.Message):
    __slots__ = ("pinned",)
    PINNED_FIELD_NUMBER: _ClassVar[int]
    pinned: bool
    def __init__(self, pinned: bool | None = ...) -> None: ...
