import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_MODE_UNSPECIFIED: _ClassVar[SnapshotMode]
    SNAPSHOT_MODE_ARENA: _ClassVar[SnapshotMode]
    SNAPSHOT_MODE_PROCESS: _ClassVar[SnapshotMode]
    SNAPSHOT_MODE_NONE: _ClassVar[SnapshotMode]

class FunctionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUNCTION_STATE_UNSPECIFIED: _ClassVar[FunctionState]
    FUNCTION_STATE_PENDING: _ClassVar[FunctionState]
    FUNCTION_STATE_READY: _ClassVar[FunctionState]
    FUNCTION_STATE_FAILED: _ClassVar[FunctionState]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_CREATING: _ClassVar[InstanceState]
    INSTANCE_STATE_SNAPSHOTTING: _ClassVar[InstanceState]
    INSTANCE_STATE_STARTING: _ClassVar[InstanceState]
    INSTANCE_STATE_STANDBY: _ClassVar[InstanceState]
    INSTANCE_STATE_RESTORING: _ClassVar[InstanceState]
    INSTANCE_STATE_RUNNING: _ClassVar[InstanceState]
    INSTANCE_STATE_IDLE: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPING: _ClassVar[InstanceState]
    INSTANCE_STATE_ENDED: _ClassVar[InstanceState]
    INSTANCE_STATE_FAILED: _ClassVar[InstanceState]

class StandbyTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STANDBY_TIER_UNSPECIFIED: _ClassVar[StandbyTier]
    STANDBY_TIER_HOT: _ClassVar[StandbyTier]
    STANDBY_TIER_COLD: _ClassVar[StandbyTier]

class SnapshotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_STATE_UNSPECIFIED: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_BUILDING: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_READY: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_FAILED: _ClassVar[SnapshotState]
    SNAPSHOT_STATE_CORRUPT: _ClassVar[SnapshotState]
SNAPSHOT_MODE_UNSPECIFIED: SnapshotMode
SNAPSHOT_MODE_ARENA: SnapshotMode
SNAPSHOT_MODE_PROCESS: SnapshotMode
SNAPSHOT_MODE_NONE: SnapshotMode
FUNCTION_STATE_UNSPECIFIED: FunctionState
FUNCTION_STATE_PENDING: FunctionState
FUNCTION_STATE_READY: FunctionState
FUNCTION_STATE_FAILED: FunctionState
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_CREATING: InstanceState
INSTANCE_STATE_SNAPSHOTTING: InstanceState
INSTANCE_STATE_STARTING: InstanceState
INSTANCE_STATE_STANDBY: InstanceState
INSTANCE_STATE_RESTORING: InstanceState
INSTANCE_STATE_RUNNING: InstanceState
INSTANCE_STATE_IDLE: InstanceState
INSTANCE_STATE_STOPPING: InstanceState
INSTANCE_STATE_ENDED: InstanceState
INSTANCE_STATE_FAILED: InstanceState
STANDBY_TIER_UNSPECIFIED: StandbyTier
STANDBY_TIER_HOT: StandbyTier
STANDBY_TIER_COLD: StandbyTier
SNAPSHOT_STATE_UNSPECIFIED: SnapshotState
SNAPSHOT_STATE_BUILDING: SnapshotState
SNAPSHOT_STATE_READY: SnapshotState
SNAPSHOT_STATE_FAILED: SnapshotState
SNAPSHOT_STATE_CORRUPT: SnapshotState

class Resources(_message.Message):
    __slots__ = ("gpu_count", "gpu_memory_bytes", "cpu_millis", "host_memory_bytes")
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    gpu_count: int
    gpu_memory_bytes: int
    cpu_millis: int
    host_memory_bytes: int
    def __init__(self, gpu_count: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., cpu_millis: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("min_instances", "max_instances", "standby_per_node", "concurrency", "queue_len", "queue_timeout", "idle_timeout", "snapshot_mode", "start_timeout")
    MIN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STANDBY_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_MODE_FIELD_NUMBER: _ClassVar[int]
    START_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    min_instances: int
    max_instances: int
    standby_per_node: int
    concurrency: int
    queue_len: int
    queue_timeout: _duration_pb2.Duration
    idle_timeout: _duration_pb2.Duration
    snapshot_mode: SnapshotMode
    start_timeout: _duration_pb2.Duration
    def __init__(self, min_instances: _Optional[int] = ..., max_instances: _Optional[int] = ..., standby_per_node: _Optional[int] = ..., concurrency: _Optional[int] = ..., queue_len: _Optional[int] = ..., queue_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., snapshot_mode: _Optional[_Union[SnapshotMode, str]] = ..., start_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class FunctionSpec(_message.Message):
    __slots__ = ("tenant", "namespace", "name", "image", "model_dir", "command", "http_port", "health_path", "sample_request", "resources", "policy", "env", "args", "served_model_name", "registry_secret", "chat_template")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    HTTP_PORT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_PATH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_SECRET_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    namespace: str
    name: str
    image: str
    model_dir: str
    command: _containers.RepeatedScalarFieldContainer[str]
    http_port: int
    health_path: str
    sample_request: str
    resources: Resources
    policy: Policy
    env: _containers.ScalarMap[str, str]
    args: _containers.RepeatedScalarFieldContainer[str]
    served_model_name: str
    registry_secret: str
    chat_template: str
    def __init__(self, tenant: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., image: _Optional[str] = ..., model_dir: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., http_port: _Optional[int] = ..., health_path: _Optional[str] = ..., sample_request: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., args: _Optional[_Iterable[str]] = ..., served_model_name: _Optional[str] = ..., registry_secret: _Optional[str] = ..., chat_template: _Optional[str] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("max_context_tokens", "vocab_size", "has_chat_template", "embedding_size", "matryoshka")
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_FIELD_NUMBER: _ClassVar[int]
    max_context_tokens: int
    vocab_size: int
    has_chat_template: bool
    embedding_size: int
    matryoshka: bool
    def __init__(self, max_context_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., embedding_size: _Optional[int] = ..., matryoshka: _Optional[bool] = ...) -> None: ...

class Function(_message.Message):
    __slots__ = ("id", "spec", "revision", "state", "status_message", "create_time", "update_time", "model", "image_digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: FunctionSpec
    revision: int
    state: FunctionState
    status_message: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    model: ModelMetadata
    image_digest: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., revision: _Optional[int] = ..., state: _Optional[_Union[FunctionState, str]] = ..., status_message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[_Union[ModelMetadata, _Mapping]] = ..., image_digest: _Optional[str] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("id", "function_id", "revision", "node", "gpu_index", "gpu_memory_bytes", "state", "endpoint", "message", "create_time", "update_time", "last_start_seconds", "host_rss_bytes", "host_pss_bytes", "host_private_bytes", "model", "image_digest", "standby_tier", "host_swap_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOST_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_PRIVATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STANDBY_TIER_FIELD_NUMBER: _ClassVar[int]
    HOST_SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    function_id: str
    revision: int
    node: str
    gpu_index: int
    gpu_memory_bytes: int
    state: InstanceState
    endpoint: str
    message: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_start_seconds: float
    host_rss_bytes: int
    host_pss_bytes: int
    host_private_bytes: int
    model: ModelMetadata
    image_digest: str
    standby_tier: StandbyTier
    host_swap_bytes: int
    def __init__(self, id: _Optional[str] = ..., function_id: _Optional[str] = ..., revision: _Optional[int] = ..., node: _Optional[str] = ..., gpu_index: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., state: _Optional[_Union[InstanceState, str]] = ..., endpoint: _Optional[str] = ..., message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_start_seconds: _Optional[float] = ..., host_rss_bytes: _Optional[int] = ..., host_pss_bytes: _Optional[int] = ..., host_private_bytes: _Optional[int] = ..., model: _Optional[_Union[ModelMetadata, _Mapping]] = ..., image_digest: _Optional[str] = ..., standby_tier: _Optional[_Union[StandbyTier, str]] = ..., host_swap_bytes: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_total_bytes", "memory_reserved_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_reserved_bytes: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "address", "blobstore_address", "gpus", "host_memory_bytes", "cached_snapshots", "heartbeat_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOBSTORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    blobstore_address: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    host_memory_bytes: int
    cached_snapshots: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., blobstore_address: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., host_memory_bytes: _Optional[int] = ..., cached_snapshots: _Optional[_Iterable[str]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class NodeCordon(_message.Message):
    __slots__ = ("node", "drain", "reason", "create_time")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    node: str
    drain: bool
    reason: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, node: _Optional[str] = ..., drain: _Optional[bool] = ..., reason: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("id", "function_id", "revision", "state", "bytes_written", "total_bytes", "manifest_digest", "disk_nodes", "cache_nodes", "message", "attempts", "build_duration")
    ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DISK_NODES_FIELD_NUMBER: _ClassVar[int]
    CACHE_NODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BUILD_DURATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    function_id: str
    revision: int
    state: SnapshotState
    bytes_written: int
    total_bytes: int
    manifest_digest: str
    disk_nodes: _containers.RepeatedScalarFieldContainer[str]
    cache_nodes: _containers.RepeatedScalarFieldContainer[str]
    message: str
    attempts: int
    build_duration: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., function_id: _Optional[str] = ..., revision: _Optional[int] = ..., state: _Optional[_Union[SnapshotState, str]] = ..., bytes_written: _Optional[int] = ..., total_bytes: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., disk_nodes: _Optional[_Iterable[str]] = ..., cache_nodes: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., attempts: _Optional[int] = ..., build_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
