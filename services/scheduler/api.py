"""The gRPC servicers (thin): SchedulerService (admin) and ClaimService (gateways).

Domain errors raised here are answered by ``snapwake.grpcserver.ErrorInterceptor``.

Admin reads go to etcd, not the mirror, so a client reads its own writes. A scheduler that
is not the leader answers every call UNAVAILABLE naming the leader, and the caller retries
there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from operator import attrgetter
from typing import Protocol

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.scheduler import spec as specs
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.nodes import NodeClient
from services.scheduler.state import ClusterState
from snapwake import errors, keys, pki
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc
from snapwake.v1.types_pb2 import Function, FunctionState, Instance, Node, NodeCordon, Snapshot

__all__ = ["ClaimServicer", "Leadership", "SchedulerServicer", "certificate_identity", "initial_state"]

_DEFAULT_LOG_TAIL = 64 << 10
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


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, state: ClusterState, nodes: NodeClient, leader: Leadership) -> None:
        self.state, self.nodes, self.leader = state, nodes, leader

    async def CreateFunction(self, request: scheduler_pb2.CreateFunctionRequest, context: grpc.aio.ServicerContext
                             ) -> scheduler_pb2.CreateFunctionResponse:
        self.leader.require()
        spec = specs.normalize(request.spec)
        now = _now()
        fn = Function(id=specs.function_id(spec), spec=spec, revision=1, state=initial_state(spec),  # type: ignore[arg-type]
                      create_time=now, update_time=now)
        await self.state.create_function(fn)
        return scheduler_pb2.CreateFunctionResponse(function=fn)

    async def GetFunction(self, request: scheduler_pb2.GetFunctionRequest, context: grpc.aio.ServicerContext
                          ) -> scheduler_pb2.GetFunctionResponse:
        self.leader.require()
        specs.split_function_id(request.function_id)
        entry = await self.state.etcd.get(keys.function_key(request.function_id), Function)
        if entry is None:
            raise errors.NotFound(f"function {request.function_id} does not exist", field="function_id")
        return scheduler_pb2.GetFunctionResponse(function=entry.value)

    async def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest, context: grpc.aio.ServicerContext
                            ) -> scheduler_pb2.ListFunctionsResponse:
        self.leader.require()
        prefix = keys.FUNCTIONS + (request.tenant + "/" if request.tenant else "")
        found: list[Function] = [e.value for e in await self.state.etcd.list(prefix, Function)]  # type: ignore[misc]
        return scheduler_pb2.ListFunctionsResponse(functions=sorted(found, key=attrgetter("id")))

    async def UpdateFunction(self, request: scheduler_pb2.UpdateFunctionRequest, context: grpc.aio.ServicerContext
                             ) -> scheduler_pb2.UpdateFunctionResponse:
        self.leader.require()
        spec = specs.normalize(request.spec)
        fid = specs.function_id(spec)

        def bump(fn: Function) -> Function:
            fn.spec.CopyFrom(spec)
            fn.revision += 1
            fn.state = initial_state(spec)  # type: ignore[assignment]
            fn.status_message = ""
            fn.ClearField("model")  # the new revision's model is read again at its first start
            fn.image_digest = ""  # and its image resolved again by its deploy validation
            fn.update_time.CopyFrom(_now())
            return fn

        try:
            fn = await self.state.update_function(fid, bump)
        except errors.NotFound as exc:
            raise errors.NotFound(f"function {fid} does not exist", field="spec.name") from exc
        return scheduler_pb2.UpdateFunctionResponse(function=fn)

    async def DeleteFunction(self, request: scheduler_pb2.DeleteFunctionRequest, context: grpc.aio.ServicerContext
                             ) -> scheduler_pb2.DeleteFunctionResponse:
        self.leader.require()
        specs.split_function_id(request.function_id)
        await self.state.delete_function(request.function_id)
        await self.state.delete_snapshots(request.function_id)
        return scheduler_pb2.DeleteFunctionResponse()

    async def ListNodes(self, request: scheduler_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
                        ) -> scheduler_pb2.ListNodesResponse:
        self.leader.require()
        found: list[Node] = [e.value for e in await self.state.etcd.list(keys.NODES, Node)]  # type: ignore[misc]
        cordons: list[NodeCordon] = [e.value for e in await self.state.etcd.list(keys.CORDONS, NodeCordon)]  # type: ignore[misc]
        return scheduler_pb2.ListNodesResponse(nodes=sorted(found, key=attrgetter("name")),
                                               cordons=sorted(cordons, key=attrgetter("node")))

    async def CordonNode(self, request: scheduler_pb2.CordonNodeRequest, context: grpc.aio.ServicerContext
                         ) -> scheduler_pb2.CordonNodeResponse:
        self.leader.require()
        name = _node_name(request.node)
        known = await self.state.etcd.get(keys.node_key(name), Node) is not None
        if not known and await self.state.etcd.get(keys.cordon_key(name), NodeCordon) is None:
            raise errors.NotFound(f"node {name} is not registered", field="node")
        cordon = NodeCordon(node=name, drain=request.drain, reason=request.reason[:500], create_time=_now())
        await self.state.put_cordon(cordon)
        return scheduler_pb2.CordonNodeResponse(cordon=cordon)

    async def UncordonNode(self, request: scheduler_pb2.UncordonNodeRequest, context: grpc.aio.ServicerContext
                           ) -> scheduler_pb2.UncordonNodeResponse:
        self.leader.require()
        name = _node_name(request.node)
        if not await self.state.delete_cordon(name):
            raise errors.NotFound(f"node {name} is not cordoned", field="node")
        return scheduler_pb2.UncordonNodeResponse()

    async def ListInstances(self, request: scheduler_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
                            ) -> scheduler_pb2.ListInstancesResponse:
        self.leader.require()
        every: list[Instance] = [e.value for e in await self.state.etcd.list(keys.INSTANCES, Instance)]  # type: ignore[misc]
        found = [i for i in every if not request.function_id or i.function_id == request.function_id]
        return scheduler_pb2.ListInstancesResponse(instances=sorted(found, key=attrgetter("id")))

    async def GetInstanceLogs(self, request: scheduler_pb2.GetInstanceLogsRequest, context: grpc.aio.ServicerContext
                              ) -> scheduler_pb2.GetInstanceLogsResponse:
        self.leader.require()
        entry = await self.state.etcd.get(keys.instance_key(request.instance_id), Instance)
        if entry is None:
            raise errors.NotFound(f"instance {request.instance_id} does not exist", field="instance_id")
        node = await self.state.etcd.get(keys.node_key(entry.value.node), Node)
        if node is None:
            raise errors.NotFound(f"node {entry.value.node} of {request.instance_id} is gone", field="instance_id")
        logs = await self.nodes.logs(node.value, request.instance_id, request.tail_bytes or _DEFAULT_LOG_TAIL)
        return scheduler_pb2.GetInstanceLogsResponse(logs=logs)

    async def ListSnapshots(self, request: scheduler_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
                            ) -> scheduler_pb2.ListSnapshotsResponse:
        self.leader.require()
        prefix = keys.SNAPSHOTS + (request.function_id + "/" if request.function_id else "")
        found: list[Snapshot] = [e.value for e in await self.state.etcd.list(prefix, Snapshot)]  # type: ignore[misc]
        return scheduler_pb2.ListSnapshotsResponse(snapshots=sorted(found, key=attrgetter("id")))


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
        """The claim holder a call speaks for: its certificate identity and its gateway id."""
        identity = self.caller(context)
        gateway_id = _required_gateway_id(gateway_id)
        return f"{identity}#{gateway_id}" if identity else gateway_id

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
