"""The gRPC servicers (thin): SchedulerService (admin) and ClaimService (gateways).

Domain errors raised here are answered by ``snapwake.grpcserver.ErrorInterceptor``.

Admin reads go to etcd, not the mirror, so a client reads its own writes. A scheduler that
is not the leader answers every call UNAVAILABLE naming the leader, and the caller retries
there.

Every SchedulerService method goes through ``_admin``: it authenticates the bearer token
(``access``), then runs the method with the ``Caller``, which scopes it to the caller's tenant,
and writes the audit line (``audit``) of a change, or of any call refused as UNAUTHENTICATED or
PERMISSION_DENIED. Quotas (``quota``) are checked where functions are created or updated.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from operator import attrgetter
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.scheduler import quota
from services.scheduler import spec as specs
from services.scheduler.access import Authenticator, Caller
from services.scheduler.audit import AuditLog
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.nodes import NodeClient
from services.scheduler.state import ClusterState
from snapwake import authz, credentials, errors, keys, pki
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc
from snapwake.v1.scheduler_pb2 import AdminToken, ApiKey, TenantQuota
from snapwake.v1.types_pb2 import (
    Function,
    FunctionState,
    Instance,
    Node,
    NodeCordon,
    Snapshot,
    SnapshotMode,
)

__all__ = ["ClaimServicer", "Leadership", "SchedulerServicer", "certificate_identity", "initial_state"]

_DEFAULT_LOG_TAIL = 64 << 10
log = logging.getLogger(__name__)
_MAX_GATEWAY_ID = 128


class Leadership(Protocol):
    def require(self) -> None:
        """Raises ``Unavailable`` naming the leader unless this process leads."""
        ...


def initial_state(spec: specs.FunctionSpec) -> int:
    """PENDING while a node must build the revision first (an arena snapshot, or a user image's
    deploy validation), else READY. A user image is never READY before one of its containers
    answered its readiness probe and warm-up: a bad one fails the deploy, not the first request."""
    if specs.validated_at_deploy(spec):
        return FunctionState.FUNCTION_STATE_PENDING
    return FunctionState.FUNCTION_STATE_READY


def _node_name(name: str) -> str:
    """A node name as nodeagents take it (``--name``); InvalidArgument otherwise."""
    if not name or "/" in name or len(name) > 253:
        raise errors.InvalidArgument(f"node: expected a node name, got {name!r}", field="node")
    return name


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


R = TypeVar("R")
Method = Callable[[Any, Any, Caller], Awaitable[R]]
# How many times a credential id that collided with a stored one is drawn again.
_ID_DRAWS = 3
_DESCRIPTION_CHARS = 200


def _fid(request: Any) -> str:
    return str(request.function_id)


def _spec_id(request: Any) -> str:
    return f"{request.spec.tenant}/{request.spec.namespace}/{request.spec.name}"


def _admin(change: bool, resource: Callable[[Any], str] = lambda _: "") -> Callable[[Method[R]], Any]:
    """Wraps a SchedulerService method ``(self, request, caller)`` into the gRPC handler
    ``(self, request, context)``: authenticate, require leadership, run, audit (module docstring)."""
    def wrap(method: Method[R]) -> Any:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: SchedulerServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
            try:
                caller = await self.auth.caller(context.invocation_metadata())
            except errors.Unauthenticated as exc:
                self.audit.record(None, context.peer(), name, resource(request), exc.code.name, exc.message)
                raise
            self.leader.require()  # a standby's UNAVAILABLE: nothing was tried, nothing to audit
            try:
                response = await method(self, request, caller)
            except errors.SnapwakeError as exc:
                if change or isinstance(exc, errors.PermissionDenied):
                    self.audit.record(caller, context.peer(), name, resource(request), exc.code.name, exc.message)
                raise
            except Exception:
                if change:
                    self.audit.record(caller, context.peer(), name, resource(request), "INTERNAL")
                raise
            if change:
                self.audit.record(caller, context.peer(), name, resource(request), "OK")
            return response

        return handler

    return wrap


def _instance_refused(caller: Caller, instance_id: str) -> errors.PermissionDenied:
    """The one answer a tenant gets for an instance that is not its own, or does not exist."""
    return errors.PermissionDenied(f"instance {instance_id!r} is not an instance of tenant {caller.tenant} "
                                   f"(token {caller.token_id})")


_CREDENTIAL_ID = re.compile(r"[0-9a-f]{1,12}")


def _credential_id(value: str, field: str, prefix: bool = False) -> str:
    """A token or key id (12 hex digits; a prefix of one with ``prefix``); InvalidArgument otherwise."""
    if (prefix and not value) or _CREDENTIAL_ID.fullmatch(value) and (prefix or len(value) == 12):
        return value
    raise errors.InvalidArgument(f"{field}: expected {'a prefix of ' if prefix else ''}an id of 12 hex digits, "
                                 f"got {value[:40]!r}", field=field)


def _description(text: str) -> str:
    if len(text) > _DESCRIPTION_CHARS or not text.isprintable():
        raise errors.InvalidArgument(f"description: at most {_DESCRIPTION_CHARS} printable characters",
                                     field="description")
    return text


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, state: ClusterState, nodes: NodeClient, leader: Leadership, auth: Authenticator | None = None,
                 audit: AuditLog | None = None, quotas: quota.Limits | None = None,
                 api_key_secret: bytes | None = None) -> None:
        self.state, self.nodes, self.leader = state, nodes, leader
        self.auth = auth or Authenticator(state.etcd, enabled=False)
        self.audit = audit or AuditLog()
        self.quota_defaults = quotas or quota.Limits()
        self.api_key_secret = api_key_secret

    async def _instances(self) -> list[Instance]:
        """Every instance record in etcd that the scheduler believes (``ClusterState.why_not_believed``:
        where its node writes, and matching what the scheduler asked that node to start)."""
        return [e.value for e in await self.state.etcd.list(keys.INSTANCES, Instance)  # type: ignore[misc]
                if self.state.why_not_believed(e.key, e.value) is None]  # type: ignore[arg-type]

    # Quotas ----------------------------------------------------------------------------
    async def _limits(self, tenant: str) -> quota.Limits:
        entry = await self.state.etcd.get(keys.quota_key(tenant), TenantQuota)
        return quota.limits_for(self.quota_defaults, entry.value if entry else None)  # type: ignore[arg-type]

    async def _usage(self, tenant: str, fns: list[Function] | None = None) -> tuple[quota.Usage, list[Function]]:
        """The tenant's use, read from etcd (its functions too, unless given), and its functions."""
        if fns is None:
            fns = [e.value for e in await self.state.etcd.list(f"{keys.FUNCTIONS}{tenant}/", Function)]  # type: ignore[misc]
        insts = await self._instances()
        snaps: list[Snapshot] = [e.value for e in await self.state.etcd.list(f"{keys.SNAPSHOTS}{tenant}/", Snapshot)]  # type: ignore[misc]
        return quota.usage(tenant, fns, insts, snaps), fns

    async def _write_function(self, fid: str, make: Callable[[Function | None], Function], creating: bool) -> Function:
        """Writes the function ``make`` builds from the stored one (None when ``creating``) once
        its tenant's quotas pass, in one etcd transaction with the read they were checked
        against (``quota.write_checked``): of two calls racing at a limit, the loser reads again
        and is refused. AlreadyExists / NotFound as the call expects."""
        tenant = quota.tenant_of(fid)
        prefix, key = f"{keys.FUNCTIONS}{tenant}/", keys.function_key(fid)

        async def attempt() -> tuple[Function, bool]:
            limits = await self._limits(tenant)
            entries, revision = await self.state.etcd.list_at(prefix, Function)
            fns: list[Function] = [e.value for e in entries]  # type: ignore[misc]
            stored = next((e for e in entries if e.key == key), None)
            current: Function | None = stored.value if stored is not None else None  # type: ignore[assignment]
            if creating and current is not None:
                raise errors.AlreadyExists(f"function {fid} already exists", field="spec.name")
            if not creating and current is None:
                raise errors.NotFound(f"function {fid} does not exist", field="spec.name")
            fn = make(current)
            if limits == quota.Limits():  # no limit at all: spare the reads, and race no other function
                return fn, await self.state.etcd.swap(key, fn, stored.mod_revision if stored is not None else 0)
            use, _ = await self._usage(tenant, fns)
            quota.check_spec(fn, limits, use, fns, fn.spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_ARENA,
                             creating)
            return fn, await self.state.etcd.put_if_unchanged(key, fn, prefix, revision, create=creating)

        return await quota.write_checked(f"function {fid}", attempt)

    # Functions -------------------------------------------------------------------------
    @_admin(change=True, resource=_spec_id)
    async def CreateFunction(self, request: scheduler_pb2.CreateFunctionRequest, caller: Caller
                             ) -> scheduler_pb2.CreateFunctionResponse:
        caller.require_tenant(request.spec.tenant, "spec.tenant")
        spec = specs.normalize(request.spec)
        now = _now()

        def make(_: Function | None) -> Function:
            return Function(id=specs.function_id(spec), spec=spec, revision=1, state=initial_state(spec),  # type: ignore[arg-type]
                            create_time=now, update_time=now)

        fn = await self._write_function(specs.function_id(spec), make, creating=True)
        return scheduler_pb2.CreateFunctionResponse(function=fn)

    @_admin(change=False, resource=_fid)
    async def GetFunction(self, request: scheduler_pb2.GetFunctionRequest, caller: Caller
                          ) -> scheduler_pb2.GetFunctionResponse:
        specs.split_function_id(request.function_id)
        caller.require_function(request.function_id, "function_id")
        entry = await self.state.etcd.get(keys.function_key(request.function_id), Function)
        if entry is None:
            raise errors.NotFound(f"function {request.function_id} does not exist", field="function_id")
        return scheduler_pb2.GetFunctionResponse(function=entry.value)

    @_admin(change=False, resource=lambda r: r.tenant)
    async def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest, caller: Caller
                            ) -> scheduler_pb2.ListFunctionsResponse:
        tenant = request.tenant or caller.tenant
        if tenant:
            caller.require_tenant(specs.check_tenant(tenant), "tenant")
        prefix = keys.FUNCTIONS + (tenant + "/" if tenant else "")
        found: list[Function] = [e.value for e in await self.state.etcd.list(prefix, Function)]  # type: ignore[misc]
        return scheduler_pb2.ListFunctionsResponse(functions=sorted(found, key=attrgetter("id")))

    @_admin(change=True, resource=_spec_id)
    async def UpdateFunction(self, request: scheduler_pb2.UpdateFunctionRequest, caller: Caller
                             ) -> scheduler_pb2.UpdateFunctionResponse:
        caller.require_tenant(request.spec.tenant, "spec.tenant")
        spec = specs.normalize(request.spec)
        fid = specs.function_id(spec)

        def bump(current: Function | None) -> Function:
            fn = Function()
            fn.CopyFrom(current)
            fn.spec.CopyFrom(spec)
            fn.revision += 1
            fn.state = initial_state(spec)  # type: ignore[assignment]
            fn.status_message = ""
            fn.ClearField("model")  # the new revision's model is read again at its first start
            fn.image_digest = ""  # and its image resolved again by its deploy validation
            fn.update_time.CopyFrom(_now())
            return fn

        fn = await self._write_function(fid, bump, creating=False)
        return scheduler_pb2.UpdateFunctionResponse(function=fn)

    @_admin(change=True, resource=_fid)
    async def DeleteFunction(self, request: scheduler_pb2.DeleteFunctionRequest, caller: Caller
                             ) -> scheduler_pb2.DeleteFunctionResponse:
        specs.split_function_id(request.function_id)
        caller.require_function(request.function_id, "function_id")
        await self.state.delete_function(request.function_id)
        await self.state.delete_snapshots(request.function_id)
        return scheduler_pb2.DeleteFunctionResponse()

    # Nodes (operator only) -------------------------------------------------------------
    @_admin(change=False)
    async def ListNodes(self, request: scheduler_pb2.ListNodesRequest, caller: Caller
                        ) -> scheduler_pb2.ListNodesResponse:
        caller.require_operator("ListNodes")
        found: list[Node] = [e.value for e in await self.state.etcd.list(keys.NODES, Node)]  # type: ignore[misc]
        cordons: list[NodeCordon] = [e.value for e in await self.state.etcd.list(keys.CORDONS, NodeCordon)]  # type: ignore[misc]
        return scheduler_pb2.ListNodesResponse(nodes=sorted(found, key=attrgetter("name")),
                                               cordons=sorted(cordons, key=attrgetter("node")))

    @_admin(change=True, resource=lambda r: r.node)
    async def CordonNode(self, request: scheduler_pb2.CordonNodeRequest, caller: Caller
                         ) -> scheduler_pb2.CordonNodeResponse:
        caller.require_operator("CordonNode")
        name = _node_name(request.node)
        known = await self.state.etcd.get(keys.node_key(name), Node) is not None
        if not known and await self.state.etcd.get(keys.cordon_key(name), NodeCordon) is None:
            raise errors.NotFound(f"node {name} is not registered", field="node")
        cordon = NodeCordon(node=name, drain=request.drain, reason=request.reason[:500], create_time=_now())
        await self.state.put_cordon(cordon)
        return scheduler_pb2.CordonNodeResponse(cordon=cordon)

    @_admin(change=True, resource=lambda r: r.node)
    async def UncordonNode(self, request: scheduler_pb2.UncordonNodeRequest, caller: Caller
                           ) -> scheduler_pb2.UncordonNodeResponse:
        caller.require_operator("UncordonNode")
        name = _node_name(request.node)
        if not await self.state.delete_cordon(name):
            raise errors.NotFound(f"node {name} is not cordoned", field="node")
        return scheduler_pb2.UncordonNodeResponse()

    # Instances and snapshots -----------------------------------------------------------
    @_admin(change=False, resource=_fid)
    async def ListInstances(self, request: scheduler_pb2.ListInstancesRequest, caller: Caller
                            ) -> scheduler_pb2.ListInstancesResponse:
        if request.function_id:
            caller.require_function(request.function_id, "function_id")
        every = await self._instances()
        found = [i for i in every if (not request.function_id or i.function_id == request.function_id)
                 and caller.may(quota.tenant_of(i.function_id))]
        return scheduler_pb2.ListInstancesResponse(instances=sorted(found, key=attrgetter("id")))

    @_admin(change=False, resource=lambda r: r.instance_id)
    async def GetInstanceLogs(self, request: scheduler_pb2.GetInstanceLogsRequest, caller: Caller
                              ) -> scheduler_pb2.GetInstanceLogsResponse:
        inst = next((i for i in await self._instances() if i.id == request.instance_id), None) \
            if request.instance_id else None
        if not caller.operator and (inst is None or not caller.may(quota.tenant_of(inst.function_id))):
            raise _instance_refused(caller, request.instance_id)
        if inst is None:
            raise errors.NotFound(f"instance {request.instance_id} does not exist", field="instance_id")
        node = await self.state.etcd.get(keys.node_key(inst.node), Node)
        if node is None:
            raise errors.NotFound(f"node {inst.node} of {request.instance_id} is gone", field="instance_id")
        logs = await self.nodes.logs(node.value, request.instance_id, request.tail_bytes or _DEFAULT_LOG_TAIL)  # type: ignore[arg-type]
        return scheduler_pb2.GetInstanceLogsResponse(logs=logs)

    @_admin(change=False, resource=_fid)
    async def ListSnapshots(self, request: scheduler_pb2.ListSnapshotsRequest, caller: Caller
                            ) -> scheduler_pb2.ListSnapshotsResponse:
        if request.function_id:
            specs.split_function_id(request.function_id)
            caller.require_function(request.function_id, "function_id")
            prefix = keys.SNAPSHOTS + request.function_id + "/"
        else:
            prefix = keys.SNAPSHOTS + (caller.tenant + "/" if caller.tenant else "")
        found: list[Snapshot] = [e.value for e in await self.state.etcd.list(prefix, Snapshot)]  # type: ignore[misc]
        return scheduler_pb2.ListSnapshotsResponse(snapshots=sorted(found, key=attrgetter("id")))

    # Admin tokens (operator only) ------------------------------------------------------
    @_admin(change=True, resource=lambda r: "operator" if r.operator else r.tenant)
    async def CreateAdminToken(self, request: scheduler_pb2.CreateAdminTokenRequest, caller: Caller
                               ) -> scheduler_pb2.CreateAdminTokenResponse:
        caller.require_operator("CreateAdminToken")
        if request.operator == bool(request.tenant):
            raise errors.InvalidArgument("give either tenant or operator, not both or neither", field="tenant")
        if request.tenant:
            specs.check_tenant(request.tenant)
        for _ in range(_ID_DRAWS):
            cred = credentials.new_credential(credentials.TOKEN_PREFIX)
            token = AdminToken(id=cred.id, tenant=request.tenant, operator=request.operator,
                               sha256=credentials.sha256_digest(cred.text),
                               description=_description(request.description), create_time=_now())
            if await self.state.etcd.create(keys.admin_token_key(cred.id), token):
                token.ClearField("sha256")
                return scheduler_pb2.CreateAdminTokenResponse(token=token, secret=cred.text)
        raise errors.Aborted("token ids collided; try again")

    @_admin(change=False)
    async def ListAdminTokens(self, request: scheduler_pb2.ListAdminTokensRequest, caller: Caller
                              ) -> scheduler_pb2.ListAdminTokensResponse:
        caller.require_operator("ListAdminTokens")
        tokens: list[AdminToken] = [e.value for e in await self.state.etcd.list(keys.ADMIN_TOKENS, AdminToken)]  # type: ignore[misc]
        for t in tokens:
            t.ClearField("sha256")
        return scheduler_pb2.ListAdminTokensResponse(tokens=tokens)

    @_admin(change=True, resource=lambda r: r.id)
    async def RevokeAdminToken(self, request: scheduler_pb2.RevokeAdminTokenRequest, caller: Caller
                               ) -> scheduler_pb2.RevokeAdminTokenResponse:
        caller.require_operator("RevokeAdminToken")
        if not await self.state.etcd.delete(keys.admin_token_key(_credential_id(request.id, "id"))):
            raise errors.NotFound(f"admin token {request.id!r} does not exist", field="id")
        return scheduler_pb2.RevokeAdminTokenResponse()

    # Gateway API keys (operator only) --------------------------------------------------
    @_admin(change=True, resource=lambda r: r.tenant)
    async def CreateApiKey(self, request: scheduler_pb2.CreateApiKeyRequest, caller: Caller
                           ) -> scheduler_pb2.CreateApiKeyResponse:
        caller.require_operator("CreateApiKey")
        specs.check_tenant(request.tenant)
        if self.api_key_secret is None:
            raise errors.FailedPrecondition("this scheduler has no api_key_secret_file: API keys cannot be made")
        for _ in range(_ID_DRAWS):
            cred = credentials.new_credential(credentials.API_KEY_PREFIX)
            key = ApiKey(id=cred.id, tenant=request.tenant,
                         hmac_sha256=credentials.hmac_digest(self.api_key_secret, cred.text),
                         description=_description(request.description), create_time=_now())
            if await self.state.etcd.create(keys.api_key_key(cred.id), key):
                key.ClearField("hmac_sha256")
                return scheduler_pb2.CreateApiKeyResponse(key=key, secret=cred.text)
        raise errors.Aborted("key ids collided; try again")

    @_admin(change=False, resource=lambda r: r.tenant)
    async def ListApiKeys(self, request: scheduler_pb2.ListApiKeysRequest, caller: Caller
                          ) -> scheduler_pb2.ListApiKeysResponse:
        caller.require_operator("ListApiKeys")
        prefix = _credential_id(request.id_prefix, "id_prefix", prefix=True)
        found: list[ApiKey] = [e.value for e in await self.state.etcd.list(keys.API_KEYS + prefix, ApiKey)]  # type: ignore[misc]
        found = [k for k in found if not request.tenant or k.tenant == request.tenant]
        for k in found:
            k.ClearField("hmac_sha256")
        return scheduler_pb2.ListApiKeysResponse(keys=found)

    @_admin(change=True, resource=lambda r: r.id)
    async def RevokeApiKey(self, request: scheduler_pb2.RevokeApiKeyRequest, caller: Caller
                           ) -> scheduler_pb2.RevokeApiKeyResponse:
        caller.require_operator("RevokeApiKey")
        if not await self.state.etcd.delete(keys.api_key_key(_credential_id(request.id, "id"))):
            raise errors.NotFound(f"API key {request.id!r} does not exist", field="id")
        return scheduler_pb2.RevokeApiKeyResponse()

    # Quotas ----------------------------------------------------------------------------
    @_admin(change=False, resource=lambda r: r.tenant)
    async def GetTenantQuota(self, request: scheduler_pb2.GetTenantQuotaRequest, caller: Caller
                             ) -> scheduler_pb2.GetTenantQuotaResponse:
        tenant = specs.check_tenant(request.tenant or caller.tenant)
        caller.require_tenant(tenant, "tenant")
        use, _ = await self._usage(tenant)
        return scheduler_pb2.GetTenantQuotaResponse(quota=(await self._limits(tenant)).to_proto(tenant),
                                                    usage=use.to_proto())

    @_admin(change=True, resource=lambda r: r.quota.tenant)
    async def SetTenantQuota(self, request: scheduler_pb2.SetTenantQuotaRequest, caller: Caller
                             ) -> scheduler_pb2.SetTenantQuotaResponse:
        caller.require_operator("SetTenantQuota")
        tenant = specs.check_tenant(request.quota.tenant, "quota.tenant")
        await self.state.etcd.put(keys.quota_key(tenant), request.quota)
        return scheduler_pb2.SetTenantQuotaResponse(quota=(await self._limits(tenant)).to_proto(tenant))


def certificate_identity(context: grpc.aio.ServicerContext) -> str:
    """The identity of the caller's verified client certificate (``pki.identity_from_pem``),
    or "" on a connection without one (no mutual TLS)."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return _identity_of(pems[0]) if pems else ""


@functools.lru_cache(maxsize=256)
def _identity_of(pem: bytes) -> str:
    identity = pki.identity_from_pem(pem)
    return str(identity) if identity is not None else ""


def _required_gateway_id(gateway_id: str) -> str:
    if not gateway_id:
        raise errors.InvalidArgument("gateway_id is required", field="gateway_id")
    if len(gateway_id) > _MAX_GATEWAY_ID:
        raise errors.InvalidArgument(f"gateway_id: at most {_MAX_GATEWAY_ID} characters", field="gateway_id")
    return gateway_id


class ClaimServicer(scheduler_pb2_grpc.ClaimServiceServicer):
    """Claims belong to the gateway that holds them: the ``gateway_id`` it sends, scoped by the
    identity of its client certificate where it has one (``caller``), so a gateway can neither
    release nor report (keep alive) another gateway's claims, whatever id it sends."""

    def __init__(self, broker: ClaimBroker, queues: QueueDepths, leader: Leadership,
                 caller: Callable[[grpc.aio.ServicerContext], str] = certificate_identity) -> None:
        self.broker, self.queues, self.leader, self.caller = broker, queues, leader, caller

    def _holder(self, context: grpc.aio.ServicerContext, gateway_id: str) -> str:
        """The claim holder a call speaks for: its certificate identity and its gateway id,
        which must be the certificate's (``authz.gateway_id_problem``: PERMISSION_DENIED naming
        the field otherwise). Without a certificate (``--dev-plaintext``) the id is taken as sent."""
        identity = self.caller(context)
        gateway_id = _required_gateway_id(gateway_id)
        if not identity:
            return gateway_id
        role, _, name = identity.partition("/")
        problem = authz.gateway_id_problem(pki.Identity(role, name), gateway_id)
        if problem is not None:
            log.warning("refused a claim call from %s: %s", identity, problem)
            raise errors.PermissionDenied(problem, field="gateway_id")
        return f"{identity}#{gateway_id}"

    async def AcquireClaim(self, request: scheduler_pb2.AcquireClaimRequest, context: grpc.aio.ServicerContext
                           ) -> scheduler_pb2.AcquireClaimResponse:
        self.leader.require()
        specs.split_function_id(request.function_id)
        holder = self._holder(context, request.gateway_id)
        remaining = context.time_remaining()
        grant = await self.broker.acquire(request.function_id, holder,
                                          remaining if remaining is not None else float("inf"))
        try:  # leadership may have run out (by our clock) while the request waited
            self.leader.require()
        except errors.Unavailable:
            self.broker.release(grant.claim.claim_id, holder, instance_failed=False)
            raise
        wait, ttl = Duration(), Duration()
        wait.FromNanoseconds(int(grant.wait_s * 1e9))
        ttl.FromNanoseconds(int(self.broker.table.ttl_s * 1e9))
        return scheduler_pb2.AcquireClaimResponse(claim_id=grant.claim.claim_id, instance_id=grant.instance.id,
                                       endpoint=grant.instance.endpoint, source=grant.source,  # type: ignore[arg-type]
                                       wait=wait, ttl=ttl)

    async def ReleaseClaim(self, request: scheduler_pb2.ReleaseClaimRequest, context: grpc.aio.ServicerContext
                           ) -> scheduler_pb2.ReleaseClaimResponse:
        self.leader.require()
        holder = self._holder(context, request.gateway_id)
        if self.broker.release(request.claim_id, holder, request.instance_failed) is None:
            raise errors.NotFound(f"claim {request.claim_id} is not held by gateway {request.gateway_id} "
                                  "(released, expired, or not reported to this leader yet)", field="claim_id")
        return scheduler_pb2.ReleaseClaimResponse()

    async def SyncApiKeys(self, request: scheduler_pb2.SyncApiKeysRequest, context: grpc.aio.ServicerContext
                          ) -> scheduler_pb2.SyncApiKeysResponse:
        """Every API key with its keyed digest, for the gateways' key tables (``services.gateway.keys``)."""
        self.leader.require()
        found: list[ApiKey] = [e.value for e in await self.broker.state.etcd.list(keys.API_KEYS, ApiKey)]  # type: ignore[misc]
        return scheduler_pb2.SyncApiKeysResponse(keys=found)

    async def ReportQueue(self, request: scheduler_pb2.ReportQueueRequest, context: grpc.aio.ServicerContext
                          ) -> scheduler_pb2.ReportQueueResponse:
        self.leader.require()
        for n, held in enumerate(request.claims):
            for name in ("claim_id", "instance_id", "function_id"):
                if not getattr(held, name):
                    raise errors.InvalidArgument(f"claims[{n}].{name} is empty", field=f"claims[{n}].{name}")
        holder = self._holder(context, request.gateway_id)
        self.broker.report(holder, request.claims)
        # Only deployed functions count: a gateway cannot grow this map with made-up ids.
        self.queues.report(holder, {fid: n for fid, n in request.depths.items() if self.broker.state.function(fid)})
        return scheduler_pb2.ReportQueueResponse()
