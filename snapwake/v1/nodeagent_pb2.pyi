import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from snapwake.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    START_TARGET_UNSPECIFIED: _ClassVar[StartTarget]
    START_TARGET_RUNNING: _ClassVar[StartTarget]
    START_TARGET_STANDBY: _ClassVar[StartTarget]
    START_TARGET_SNAPSHOT: _ClassVar[StartTarget]
START_TARGET_UNSPECIFIED: StartTarget
START_TARGET_RUNNING: StartTarget
START_TARGET_STANDBY: StartTarget
START_TARGET_SNAPSHOT: StartTarget

class StartInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "function_id", "revision", "spec", "target", "gpu_index", "gpu_memory_bytes", "timeout", "image_digest")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    function_id: str
    revision: int
    spec: _types_pb2.FunctionSpec
    target: StartTarget
    gpu_index: int
    gpu_memory_bytes: int
    timeout: _duration_pb2.Duration
    image_digest: str
    def __init__(self, instance_id: _Optional[str] = ..., function_id: _Optional[str] = ..., revision: _Optional[int] = ..., spec: _Optional[_Union[_types_pb2.FunctionSpec, _Mapping]] = ..., target: _Optional[_Union[StartTarget, str]] = ..., gpu_index: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., image_digest: _Optional[str] = ...) -> None: ...

class StartInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.Instance
    def __init__(self, instance: _Optional[_Union[_types_pb2.Instance, _Mapping]] = ...) -> None: ...

class RestoreInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "gpu_index")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    gpu_index: int
    def __init__(self, instance_id: _Optional[str] = ..., gpu_index: _Optional[int] = ...) -> None: ...

class RestoreInstanceResponse(_message.Message):
    __slots__ = ("instance", "restore_duration", "dma_duration", "dma_bytes", "total_duration")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    RESTORE_DURATION_FIELD_NUMBER: _ClassVar[int]
    DMA_DURATION_FIELD_NUMBER: _ClassVar[int]
    DMA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DURATION_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.Instance
    restore_duration: _duration_pb2.Duration
    dma_duration: _duration_pb2.Duration
    dma_bytes: int
    total_duration: _duration_pb2.Duration
    def __init__(self, instance: _Optional[_Union[_types_pb2.Instance, _Mapping]] = ..., restore_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dma_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dma_bytes: _Optional[int] = ..., total_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SuspendInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class SuspendInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.Instance
    def __init__(self, instance: _Optional[_Union[_types_pb2.Instance, _Mapping]] = ...) -> None: ...

class StopInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class StopInstanceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeAgentServiceListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeAgentServiceListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[_types_pb2.Instance, _Mapping]]] = ...) -> None: ...

class NodeAgentServiceGetInstanceLogsRequest(_message.Message):
    __slots__ = ("instance_id", "tail_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    tail_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., tail_bytes: _Optional[int] = ...) -> None: ...

class NodeAgentServiceGetInstanceLogsResponse(_message.Message):
    __slots__ = ("logs",)
    LOGS_FIELD_NUMBER: _ClassVar[int]
    logs: str
    def __init__(self, logs: _Optional[str] = ...) -> None: ...
