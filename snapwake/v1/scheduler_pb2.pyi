import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from snapwake.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClaimSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLAIM_SOURCE_UNSPECIFIED: _ClassVar[ClaimSource]
    CLAIM_SOURCE_WARM: _ClassVar[ClaimSource]
    CLAIM_SOURCE_COLD_START: _ClassVar[ClaimSource]
    CLAIM_SOURCE_NORMAL_START: _ClassVar[ClaimSource]
CLAIM_SOURCE_UNSPECIFIED: ClaimSource
CLAIM_SOURCE_WARM: ClaimSource
CLAIM_SOURCE_COLD_START: ClaimSource
CLAIM_SOURCE_NORMAL_START: ClaimSource

class AdminToken(_message.Message):
    __slots__ = ("id", "tenant", "operator", "sha256", "description", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    operator: bool
    sha256: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., operator: _Optional[bool] = ..., sha256: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateAdminTokenRequest(_message.Message):
    __slots__ = ("tenant", "operator", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    operator: bool
    description: str
    def __init__(self, tenant: _Optional[str] = ..., operator: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class CreateAdminTokenResponse(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: AdminToken
    secret: str
    def __init__(self, token: _Optional[_Union[AdminToken, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListAdminTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdminTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[AdminToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[AdminToken, _Mapping]]] = ...) -> None: ...

class RevokeAdminTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeAdminTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "tenant", "hmac_sha256", "description", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    HMAC_SHA256_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    hmac_sha256: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., hmac_sha256: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "description")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    description: str
    def __init__(self, tenant: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("id_prefix", "tenant")
    ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id_prefix: str
    tenant: str
    def __init__(self, id_prefix: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TenantQuota(_message.Message):
    __slots__ = ("tenant", "max_functions", "max_standbys", "max_snapshot_bytes", "max_gpu_memory_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STANDBYS_FIELD_NUMBER: _ClassVar[int]
    MAX_SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    max_functions: int
    max_standbys: int
    max_snapshot_bytes: int
    max_gpu_memory_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., max_functions: _Optional[int] = ..., max_standbys: _Optional[int] = ..., max_snapshot_bytes: _Optional[int] = ..., max_gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("functions", "standbys", "snapshot_bytes", "gpu_memory_bytes")
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    STANDBYS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    functions: int
    standbys: int
    snapshot_bytes: int
    gpu_memory_bytes: int
    def __init__(self, functions: _Optional[int] = ..., standbys: _Optional[int] = ..., snapshot_bytes: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class GetTenantQuotaRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetTenantQuotaResponse(_message.Message):
    __slots__ = ("quota", "usage")
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    quota: TenantQuota
    usage: TenantUsage
    def __init__(self, quota: _Optional[_Union[TenantQuota, _Mapping]] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ...) -> None: ...

class SetTenantQuotaRequest(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: TenantQuota
    def __init__(self, quota: _Optional[_Union[TenantQuota, _Mapping]] = ...) -> None: ...

class SetTenantQuotaResponse(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: TenantQuota
    def __init__(self, quota: _Optional[_Union[TenantQuota, _Mapping]] = ...) -> None: ...

class CreateFunctionRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.FunctionSpec
    def __init__(self, spec: _Optional[_Union[_types_pb2.FunctionSpec, _Mapping]] = ...) -> None: ...

class CreateFunctionResponse(_message.Message):
    __slots__ = ("function",)
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    function: _types_pb2.Function
    def __init__(self, function: _Optional[_Union[_types_pb2.Function, _Mapping]] = ...) -> None: ...

class GetFunctionRequest(_message.Message):
    __slots__ = ("function_id",)
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    def __init__(self, function_id: _Optional[str] = ...) -> None: ...

class GetFunctionResponse(_message.Message):
    __slots__ = ("function",)
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    function: _types_pb2.Function
    def __init__(self, function: _Optional[_Union[_types_pb2.Function, _Mapping]] = ...) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Function]
    def __init__(self, functions: _Optional[_Iterable[_Union[_types_pb2.Function, _Mapping]]] = ...) -> None: ...

class UpdateFunctionRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.FunctionSpec
    def __init__(self, spec: _Optional[_Union[_types_pb2.FunctionSpec, _Mapping]] = ...) -> None: ...

class UpdateFunctionResponse(_message.Message):
    __slots__ = ("function",)
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    function: _types_pb2.Function
    def __init__(self, function: _Optional[_Union[_types_pb2.Function, _Mapping]] = ...) -> None: ...

class DeleteFunctionRequest(_message.Message):
    __slots__ = ("function_id",)
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    def __init__(self, function_id: _Optional[str] = ...) -> None: ...

class DeleteFunctionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "cordons")
    NODES_FIELD_NUMBER: _ClassVar[int]
    CORDONS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_types_pb2.Node]
    cordons: _containers.RepeatedCompositeFieldContainer[_types_pb2.NodeCordon]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_types_pb2.Node, _Mapping]]] = ..., cordons: _Optional[_Iterable[_Union[_types_pb2.NodeCordon, _Mapping]]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("function_id",)
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    def __init__(self, function_id: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[_types_pb2.Instance, _Mapping]]] = ...) -> None: ...

class GetInstanceLogsRequest(_message.Message):
    __slots__ = ("instance_id", "tail_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    tail_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., tail_bytes: _Optional[int] = ...) -> None: ...

class GetInstanceLogsResponse(_message.Message):
    __slots__ = ("logs",)
    LOGS_FIELD_NUMBER: _ClassVar[int]
    logs: str
    def __init__(self, logs: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("function_id",)
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    def __init__(self, function_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[_types_pb2.Snapshot]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[_types_pb2.Snapshot, _Mapping]]] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("node", "drain", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    drain: bool
    reason: str
    def __init__(self, node: _Optional[str] = ..., drain: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CordonNodeResponse(_message.Message):
    __slots__ = ("cordon",)
    CORDON_FIELD_NUMBER: _ClassVar[int]
    cordon: _types_pb2.NodeCordon
    def __init__(self, cordon: _Optional[_Union[_types_pb2.NodeCordon, _Mapping]] = ...) -> None: ...

class UncordonNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class UncordonNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SyncApiKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SyncApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class AcquireClaimRequest(_message.Message):
    __slots__ = ("function_id", "request_id", "gateway_id")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    request_id: str
    gateway_id: str
    def __init__(self, function_id: _Optional[str] = ..., request_id: _Optional[str] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class AcquireClaimResponse(_message.Message):
    __slots__ = ("claim_id", "instance_id", "endpoint", "source", "wait", "ttl")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    instance_id: str
    endpoint: str
    source: ClaimSource
    wait: _duration_pb2.Duration
    ttl: _duration_pb2.Duration
    def __init__(self, claim_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., source: _Optional[_Union[ClaimSource, str]] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReleaseClaimRequest(_message.Message):
    __slots__ = ("claim_id", "instance_failed", "gateway_id")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FAILED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    instance_failed: bool
    gateway_id: str
    def __init__(self, claim_id: _Optional[str] = ..., instance_failed: _Optional[bool] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class ReleaseClaimResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportQueueRequest(_message.Message):
    __slots__ = ("gateway_id", "depths", "claims")
    class DepthsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    DEPTHS_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    depths: _containers.ScalarMap[str, int]
    claims: _containers.RepeatedCompositeFieldContainer[HeldClaim]
    def __init__(self, gateway_id: _Optional[str] = ..., depths: _Optional[_Mapping[str, int]] = ..., claims: _Optional[_Iterable[_Union[HeldClaim, _Mapping]]] = ...) -> None: ...

class HeldClaim(_message.Message):
    __slots__ = ("claim_id", "instance_id", "function_id")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    instance_id: str
    function_id: str
    def __init__(self, claim_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., function_id: _Optional[str] = ...) -> None: ...

class ReportQueueResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
