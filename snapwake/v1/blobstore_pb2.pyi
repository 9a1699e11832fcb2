from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ManifestTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("snapshot_id", "arena_bytes", "chunk_bytes", "chunk_sha256", "tensors", "modelserver_config_json")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MODELSERVER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    arena_bytes: int
    chunk_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[ManifestTensor]
    modelserver_config_json: str
    def __init__(self, snapshot_id: _Optional[str] = ..., arena_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[ManifestTensor, _Mapping]]] = ..., modelserver_config_json: _Optional[str] = ...) -> None: ...

class PutSnapshotRequest(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutSnapshotResponse(_message.Message):
    __slots__ = ("snapshot_id", "bytes_written", "manifest_digest")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    bytes_written: int
    manifest_digest: str
    def __init__(self, snapshot_id: _Optional[str] = ..., bytes_written: _Optional[int] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id", "manifest_digest")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    manifest_digest: str
    def __init__(self, snapshot_id: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class StatSnapshotResponse(_message.Message):
    __slots__ = ("manifest", "on_disk", "in_cache", "manifest_digest", "bytes_written")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ON_DISK_FIELD_NUMBER: _ClassVar[int]
    IN_CACHE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    on_disk: bool
    in_cache: bool
    manifest_digest: str
    bytes_written: int
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., on_disk: _Optional[bool] = ..., in_cache: _Optional[bool] = ..., manifest_digest: _Optional[str] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class BlobstoreServiceListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BlobstoreServiceListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "cache_bytes_used", "cache_bytes_budget")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[StatSnapshotResponse]
    cache_bytes_used: int
    cache_bytes_budget: int
    def __init__(self, snapshots: _Optional[_Iterable[_Union[StatSnapshotResponse, _Mapping]]] = ..., cache_bytes_used: _Optional[int] = ..., cache_bytes_budget: _Optional[int] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrewarmSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id", "peers", "manifest_digest")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    peers: _containers.RepeatedScalarFieldContainer[str]
    manifest_digest: str
    def __init__(self, snapshot_id: _Optional[str] = ..., peers: _Optional[_Iterable[str]] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class PrewarmSnapshotResponse(_message.Message):
    __slots__ = ("was_cached", "fetched_from_peer", "bytes")
    WAS_CACHED_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FROM_PEER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    was_cached: bool
    fetched_from_peer: bool
    bytes: int
    def __init__(self, was_cached: _Optional[bool] = ..., fetched_from_peer: _Optional[bool] = ..., bytes: _Optional[int] = ...) -> None: ...

class VerifySnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class VerifySnapshotResponse(_message.Message):
    __slots__ = ("ok", "bad_chunk", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    BAD_CHUNK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    bad_chunk: int
    message: str
    def __init__(self, ok: _Optional[bool] = ..., bad_chunk: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class OpenInstanceHandoverRequest(_message.Message):
    __slots__ = ("instance_id", "function_id", "gpu_index", "instance_dir")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_DIR_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    function_id: str
    gpu_index: int
    instance_dir: str
    def __init__(self, instance_id: _Optional[str] = ..., function_id: _Optional[str] = ..., gpu_index: _Optional[int] = ..., instance_dir: _Optional[str] = ...) -> None: ...

class OpenInstanceHandoverResponse(_message.Message):
    __slots__ = ("socket_path",)
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    socket_path: str
    def __init__(self, socket_path: _Optional[str] = ...) -> None: ...

class CloseInstanceHandoverRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class CloseInstanceHandoverResponse(_message.Message):
    __slots__ = ("was_open",)
    WAS_OPEN_FIELD_NUMBER: _ClassVar[int]
    was_open: bool
    def __init__(self, was_open: _Optional[bool] = ...) -> None: ...
