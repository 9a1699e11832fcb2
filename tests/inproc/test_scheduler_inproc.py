"""The scheduler over real etcd and real gRPC: admin API, claims, snapshots, election.

The nodeagent here is a small real gRPC server written for these tests (it registers a node
in etcd and writes instance keys like the real one); the integration layer runs the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio

from services.gateway.errors import QueueTimeout
from services.gateway.queue import ClaimQueue
from services.gateway.scheduler_client import Claim, ClaimSource, FunctionInfo, GrpcSchedulerClient
from services.scheduler.app import Scheduler
from services.scheduler.config import SchedulerConfig
from snapwake import keys
from snapwake.etcd import Etcd
from snapwake.grpcserver import GrpcServer, channel
from snapwake.testing import EtcdProcess
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from snapwake.v1.types_pb2 import (
    FunctionSpec,
    FunctionState,
    Gpu,
    Instance,
    InstanceState,
    ModelMetadata,
    Node,
    Policy,
    Resources,
    Snapshot,
    SnapshotMode,
    SnapshotState,
)

# One loop for the module: grpc.aio keeps per-loop pollers that break across loops.
pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class FakeNode(nodeagent_pb2_grpc.NodeAgentServiceServicer):
    """A NodeAgentService that writes etcd like the real agent but runs no containers."""

    store: Etcd
    name: str = "node-a"
    start_delay_s: float = 0.2
    restore_delay_s: float = 0.0
    stop_delay_s: float = 0.0
    stops_in_flight: int = 0
    stops_in_flight_peak: int = 0
    fail_reason: str = ""
    model: ModelMetadata | None = None  # what the real node reads from the model dir at start
    digest: str = "sha256:" + "d1" * 32  # what the real node's pull resolves a user image to
    pinned: list[str] = field(default_factory=list)  # StartInstanceRequest.image_digest, per start
    calls: list[tuple[str, int]] = field(default_factory=list)
    server: GrpcServer | None = None

    async def register(self) -> None:
        self.server = GrpcServer("127.0.0.1:0", [nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgentService"].full_name])
        nodeagent_pb2_grpc.add_NodeAgentServiceServicer_to_server(self, self.server.server)
        await self.server.start()
        node = Node(name=self.name, address=f"127.0.0.1:{self.server.port}",
                    gpus=[Gpu(index=0, memory_total_bytes=80 << 30)])
        await self.store.put(keys.node_key(self.name), node)

    async def _put(self, inst: Instance) -> Instance:
        await self.store.put(keys.instance_key(inst.node, inst.id), inst)
        return inst

    async def StartInstance(self, request: nodeagent_pb2.StartInstanceRequest, context: grpc.aio.ServicerContext
                            ) -> nodeagent_pb2.StartInstanceResponse:
        self.calls.append(("start", request.target))
        self.pinned.append(request.image_digest)
        user = request.spec.image not in ("", "builtin")
        inst = await self._put(Instance(id=request.instance_id, function_id=request.function_id,
                                        revision=request.revision, node=self.name, gpu_index=request.gpu_index,
                                        gpu_memory_bytes=request.gpu_memory_bytes, state=InstanceState.INSTANCE_STATE_CREATING,
                                        model=None if user else self.model,
                                        image_digest=(request.image_digest or self.digest) if user else ""))
        await asyncio.sleep(self.start_delay_s)
        if self.fail_reason:
            inst.state, inst.message = InstanceState.INSTANCE_STATE_FAILED, self.fail_reason
            await self._put(inst)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.fail_reason)
        if request.target == nodeagent_pb2.START_TARGET_SNAPSHOT:
            await self.store.delete(keys.instance_key(inst.node, inst.id))
            return nodeagent_pb2.StartInstanceResponse(instance=inst)
        inst.state = InstanceState.INSTANCE_STATE_STANDBY if request.target == nodeagent_pb2.START_TARGET_STANDBY else InstanceState.INSTANCE_STATE_RUNNING
        inst.endpoint = f"127.0.0.1:9{len(self.calls):03d}"
        return nodeagent_pb2.StartInstanceResponse(instance=await self._put(inst))

    async def RestoreInstance(self, request: nodeagent_pb2.RestoreInstanceRequest, context: grpc.aio.ServicerContext
                              ) -> nodeagent_pb2.RestoreInstanceResponse:
        self.calls.append(("restore", 0))
        got = await self.store.get(keys.instance_key(self.name, request.instance_id), Instance)
        assert got is not None
        inst = Instance()
        inst.CopyFrom(got.value)
        if self.restore_delay_s:  # RESTORING for a while, as a real node shows it
            inst.state = InstanceState.INSTANCE_STATE_RESTORING
            await self._put(inst)
            await asyncio.sleep(self.restore_delay_s)
        inst.state, inst.gpu_index = InstanceState.INSTANCE_STATE_RUNNING, request.gpu_index
        return nodeagent_pb2.RestoreInstanceResponse(instance=await self._put(inst))

    async def SuspendInstance(self, request: nodeagent_pb2.SuspendInstanceRequest, context: grpc.aio.ServicerContext
                              ) -> nodeagent_pb2.SuspendInstanceResponse:
        self.calls.append(("suspend", 0))
        got = await self.store.get(keys.instance_key(self.name, request.instance_id), Instance)
        assert got is not None
        inst = Instance()
        inst.CopyFrom(got.value)
        inst.state = InstanceState.INSTANCE_STATE_STANDBY
        return nodeagent_pb2.SuspendInstanceResponse(instance=await self._put(inst))

    async def StopInstance(self, request: nodeagent_pb2.StopInstanceRequest, context: grpc.aio.ServicerContext
                           ) -> nodeagent_pb2.StopInstanceResponse:
        self.calls.append(("stop", 0))
        self.stops_in_flight += 1
        self.stops_in_flight_peak = max(self.stops_in_flight_peak, self.stops_in_flight)
        try:
            await asyncio.sleep(self.stop_delay_s)
            await self.store.delete(keys.instance_key(self.name, request.instance_id))
        finally:
            self.stops_in_flight -= 1
        return nodeagent_pb2.StopInstanceResponse()

    async def GetInstanceLogs(self, request: nodeagent_pb2.NodeAgentServiceGetInstanceLogsRequest, context: grpc.aio.ServicerContext
                              ) -> nodeagent_pb2.NodeAgentServiceGetInstanceLogsResponse:
        return nodeagent_pb2.NodeAgentServiceGetInstanceLogsResponse(logs=f"log of {request.instance_id} tail={request.tail_bytes}")

    def count(self, kind: str, target: int | None = None) -> int:
        return sum(1 for k, t in self.calls if k == kind and (target is None or t == target))


def cfg(etcd: EtcdProcess, **overrides: object) -> SchedulerConfig:
    # No gateway reports to these schedulers unless a test does: a short grace window will do,
    # and claims must outlive the tests that hold them without reporting.
    base = SchedulerConfig(listen="127.0.0.1:0", etcd=etcd.address, election_ttl_s=2, reconcile_interval_s=0.1,
                           claim_adopt_grace_s=0.3, claim_ttl_s=60.0)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def wait_until(check: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not true after {limit_s}s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(store: Etcd, etcd: EtcdProcess, **overrides: object) -> AsyncIterator[Scheduler]:
    sched = Scheduler(cfg(etcd, **overrides), store)
    await sched.start()
    try:
        yield sched
    finally:
        await sched.stop(grace_s=0.5)


@pytest_asyncio.fixture(loop_scope="module")
async def store(etcd_server: EtcdProcess) -> AsyncIterator[Etcd]:
    async with Etcd.connect(etcd_server.address) as s:
        await s.delete_prefix(keys.PREFIX)
        yield s
        await s.delete_prefix(keys.PREFIX)


@pytest_asyncio.fixture(loop_scope="module")
async def leader(store: Etcd, etcd_server: EtcdProcess) -> AsyncIterator[Scheduler]:
    async with running(store, etcd_server) as sched:
        # Leading, and past the grace window in which a new leader collects the gateways' claims.
        await wait_until(lambda: sched.election.is_leader and not sched.broker.settling_s(), 10, "leadership")
        yield sched


@pytest_asyncio.fixture(loop_scope="module")
async def node(store: Etcd) -> AsyncIterator[FakeNode]:
    fake = FakeNode(store)
    await fake.register()
    yield fake
    assert fake.server is not None
    await fake.server.stop(0)


def stubs(sched: Scheduler) -> tuple[scheduler_pb2_grpc.SchedulerServiceStub, scheduler_pb2_grpc.ClaimServiceStub]:
    ch = channel(f"127.0.0.1:{sched.port}")
    return scheduler_pb2_grpc.SchedulerServiceStub(ch), scheduler_pb2_grpc.ClaimServiceStub(ch)


def custom(name: str, concurrency: int = 2, max_instances: int = 1) -> FunctionSpec:
    """A function that is READY as soon as it is created (the built-in image without a snapshot),
    for the tests of claims and scaling. A user image is PENDING until its deploy validation:
    see ``user_image``."""
    return FunctionSpec(name=name, model_dir="/models/echo",
                        policy=Policy(snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE, concurrency=concurrency,
                                      max_instances=max_instances))


def user_image(name: str, image: str = "docker://registry.local/acme/echo:1") -> FunctionSpec:
    return FunctionSpec(name=name, image=image, served_model_name="acme/Echo-1B", http_port=9000)


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def test_admin_crud(leader: Scheduler) -> None:
    admin, _ = stubs(leader)
    spec = FunctionSpec(name="llama", model_dir="/models/llama")
    created = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function
    assert (created.id, created.revision, created.state) == ("default/default/llama", 1, FunctionState.FUNCTION_STATE_PENDING)
    assert created.spec.policy.max_instances == 4
    assert (await code_of(admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)))[0] \
        == grpc.StatusCode.ALREADY_EXISTS
    code, details = await code_of(admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(
        spec=FunctionSpec(name="x", model_dir="/m", policy=Policy(min_instances=9, max_instances=2))), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.policy.min_instances" in details
    other = custom("echo")
    other.tenant = "acme"
    ready = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=other), timeout=5)).function
    assert ready.state == FunctionState.FUNCTION_STATE_READY
    got = (await admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=created.id), timeout=5)).function
    assert got == created
    listed = (await admin.ListFunctions(scheduler_pb2.ListFunctionsRequest(tenant="acme"), timeout=5)).functions
    assert [f.id for f in listed] == ["acme/default/echo"]
    assert len((await admin.ListFunctions(scheduler_pb2.ListFunctionsRequest(), timeout=5)).functions) == 2
    other.policy.concurrency = 8
    updated = (await admin.UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=other), timeout=5)).function
    assert (updated.revision, updated.spec.policy.concurrency) == (2, 8)
    await admin.DeleteFunction(scheduler_pb2.DeleteFunctionRequest(function_id=created.id), timeout=5)
    for call in (admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=created.id), timeout=5),
                 admin.DeleteFunction(scheduler_pb2.DeleteFunctionRequest(function_id=created.id), timeout=5),
                 admin.UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=custom("nope")), timeout=5)):
        assert (await code_of(call))[0] == grpc.StatusCode.NOT_FOUND
    code, details = await code_of(admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id="bad id"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "function_id" in details


async def test_restarted_scheduler_sees_functions(store: Etcd, etcd_server: EtcdProcess) -> None:
    async with running(store, etcd_server) as first:
        await wait_until(lambda: first.election.is_leader, 10, "first leadership")
        admin, _ = stubs(first)
        await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=custom("kept")), timeout=5)
    async with running(store, etcd_server) as second:
        await wait_until(lambda: second.election.is_leader, 10, "second leadership")
        assert second.state.function("default/default/kept") is not None
        admin, _ = stubs(second)
        got = (await admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id="default/default/kept"), timeout=5))
        assert got.function.revision == 1


async def test_burst_never_exceeds_concurrency(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=custom("burst")), timeout=5)).function.id
    holding: dict[str, int] = {}
    peak = 0
    sources: list[int] = []

    async def one(k: int) -> None:
        nonlocal peak
        got = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, request_id=f"r{k}", gateway_id="gw"),
                                        timeout=20)
        sources.append(got.source)
        holding[got.instance_id] = holding.get(got.instance_id, 0) + 1
        peak = max(peak, holding[got.instance_id])
        await asyncio.sleep(0.05)
        holding[got.instance_id] -= 1
        await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=got.claim_id, gateway_id="gw"), timeout=5)

    await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(20))), 30)
    assert peak == 2 and len(sources) == 20
    assert node.count("start", nodeagent_pb2.START_TARGET_RUNNING) == 1
    assert sources.count(scheduler_pb2.CLAIM_SOURCE_NORMAL_START) >= 1
    assert set(sources) <= {scheduler_pb2.CLAIM_SOURCE_NORMAL_START, scheduler_pb2.CLAIM_SOURCE_WARM}
    assert len(leader.table) == 0


async def test_failing_start_fails_all_waiters_fast(leader: Scheduler, node: FakeNode) -> None:
    node.fail_reason = "model dir /nope has no config.json"
    admin, claims = stubs(leader)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=custom("broken")), timeout=5)).function.id
    began = time.monotonic()
    calls = [claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=20)
             for _ in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert time.monotonic() - began < 5
    assert node.count("start") == 1
    for res in results:
        assert isinstance(res, grpc.aio.AioRpcError) and res.code() == grpc.StatusCode.UNAVAILABLE
        assert (res.details() or "").startswith("start failed: ") and "no config.json" in (res.details() or "")


async def test_wait_times_out_when_max_is_busy(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    spec = custom("busy", concurrency=1)
    spec.policy.queue_timeout.FromSeconds(1)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    held = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    assert held.source == scheduler_pb2.CLAIM_SOURCE_NORMAL_START and held.endpoint
    code, details = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and fid in details
    assert (await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id="a/b/none", gateway_id="gw"), timeout=5)))[0] \
        == grpc.StatusCode.NOT_FOUND
    logs = await admin.GetInstanceLogs(scheduler_pb2.GetInstanceLogsRequest(instance_id=held.instance_id), timeout=5)
    assert logs.logs == f"log of {held.instance_id} tail=65536"


async def test_arena_function_snapshot_standby_and_cold_start(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    spec = FunctionSpec(name="tiny", model_dir="/models/tiny", resources=Resources(gpu_count=1, gpu_memory_bytes=1 << 30))
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    await wait_until(lambda: (f := leader.state.function(fid)) is not None
                     and f.state == FunctionState.FUNCTION_STATE_READY, 10, "function READY")
    snaps = (await admin.ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=fid), timeout=5)).snapshots
    assert [(s.id, s.state, s.attempts) for s in snaps] == [(f"{fid}@1", SnapshotState.SNAPSHOT_STATE_READY, 1)]
    await wait_until(lambda: any(i.state == InstanceState.INSTANCE_STATE_STANDBY for i in leader.state.instances()), 10,
                     "a standby")
    got = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    assert got.source == scheduler_pb2.CLAIM_SOURCE_COLD_START and node.count("restore") == 1
    # The serving instance covers the node's standby need: no fresh standby container is started.
    await asyncio.sleep(1.5)
    assert node.count("start", nodeagent_pb2.START_TARGET_STANDBY) == 1
    # Once idle past idle_timeout it is parked back into the standby (suspend, not stop) ...
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=got.claim_id, gateway_id="gw"), timeout=5)
    entry = await leader.etcd.get(keys.instance_key("node-a", got.instance_id), Instance)
    assert entry is not None
    idle = entry.value
    idle.state = InstanceState.INSTANCE_STATE_IDLE
    idle.update_time.FromSeconds(int(time.time()) - 3600)
    await leader.etcd.put(keys.instance_key("node-a", got.instance_id), idle)
    await wait_until(lambda: node.count("suspend") == 1, 10, "idle instance parked")
    assert node.count("stop") == 0
    await wait_until(lambda: (i := leader.state.instance(got.instance_id)) is not None
                     and i.state == InstanceState.INSTANCE_STATE_STANDBY, 10, "parked instance is the standby again")
    # ... and the next request is a cold start of that same container.
    again = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    assert again.source == scheduler_pb2.CLAIM_SOURCE_COLD_START and again.instance_id == got.instance_id


async def test_each_revision_records_the_model_its_first_instance_reported(leader: Scheduler, node: FakeNode) -> None:
    """Function.model, which the gateways check requests against, comes from the first instance
    of the revision: the snapshot build (ARENA) or the first start (NONE); an update clears it."""
    admin, claims = stubs(leader)
    node.model = ModelMetadata(max_context_tokens=4096, vocab_size=32000, has_chat_template=True)

    def recorded(fid: str) -> ModelMetadata | None:
        fn = leader.state.function(fid)
        return fn.model if fn is not None and fn.HasField("model") else None

    arena = FunctionSpec(name="meta-arena", model_dir="/models/a",
                         resources=Resources(gpu_count=1, gpu_memory_bytes=1 << 30))
    arena_id = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=arena), timeout=5)).function.id
    await wait_until(lambda: recorded(arena_id) == node.model, 10, "the snapshot build's model recorded")

    plain = FunctionSpec(name="meta-plain", model_dir="/models/p", policy=Policy(snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE))
    created = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=plain), timeout=5)).function
    assert created.state == FunctionState.FUNCTION_STATE_READY and not created.HasField("model")
    got = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=created.id, gateway_id="gw"), timeout=10)
    await wait_until(lambda: recorded(created.id) == node.model, 10, "the first start's model recorded")
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=got.claim_id, gateway_id="gw"), timeout=5)
    listed = (await admin.ListFunctions(scheduler_pb2.ListFunctionsRequest(), timeout=5)).functions
    assert FunctionInfo.from_proto(next(f for f in listed if f.id == created.id)).limits is not None

    node.model = ModelMetadata(max_context_tokens=8192, vocab_size=128256)
    updated = (await admin.UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=plain), timeout=5)).function
    assert updated.revision == 2 and not updated.HasField("model")
    await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=created.id, gateway_id="gw"), timeout=10)
    await wait_until(lambda: recorded(created.id) == node.model, 10, "revision 2's model recorded")


async def test_a_standby_being_restored_still_covers_the_standby_need(leader: Scheduler, node: FakeNode) -> None:
    """While the only standby is RESTORING (2 s here; ~0.7 s on the H100), the controller must
    not start a fresh standby: the restored instance parks back into one when it idles out."""
    node.restore_delay_s = 2.0
    admin, claims = stubs(leader)
    spec = FunctionSpec(name="slowrestore", model_dir="/models/tiny",
                        resources=Resources(gpu_count=1, gpu_memory_bytes=1 << 30))
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    await wait_until(lambda: any(i.function_id == fid and i.state == InstanceState.INSTANCE_STATE_STANDBY
                                 for i in leader.state.instances()), 15, "a standby")
    got = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=15)
    assert got.source == scheduler_pb2.CLAIM_SOURCE_COLD_START
    await asyncio.sleep(1.0)
    assert node.count("start", nodeagent_pb2.START_TARGET_STANDBY) == 1
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=got.claim_id, gateway_id="gw"), timeout=5)


async def test_snapshot_build_fails_after_three_attempts(leader: Scheduler, node: FakeNode) -> None:
    node.fail_reason, node.start_delay_s = "out of host memory", 0.0
    admin, claims = stubs(leader)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(
        spec=FunctionSpec(name="doomed", model_dir="/models/x")), timeout=5)).function.id
    await wait_until(lambda: (f := leader.state.function(fid)) is not None
                     and f.state == FunctionState.FUNCTION_STATE_FAILED, 15, "function FAILED")
    fn = leader.state.function(fid)
    assert fn is not None and "after 3 attempts" in fn.status_message and "out of host memory" in fn.status_message
    assert node.count("start", nodeagent_pb2.START_TARGET_SNAPSHOT) == 3
    code, details = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "out of host memory" in details
    entry = await leader.etcd.get(keys.snapshot_key(fid, 1), Snapshot)
    assert entry is not None and entry.value.state == SnapshotState.SNAPSHOT_STATE_FAILED


async def test_a_user_image_is_pending_until_validated_then_ready_with_its_digest(
        leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    created = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=user_image("byo")), timeout=5)).function
    assert created.state == FunctionState.FUNCTION_STATE_PENDING and created.image_digest == ""
    assert created.spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_PROCESS
    fid = created.id
    await wait_until(lambda: (f := leader.state.function(fid)) is not None
                     and f.state == FunctionState.FUNCTION_STATE_READY, 10, "function READY")
    got = (await admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=5)).function
    assert got.image_digest == node.digest and got.status_message == ""
    assert node.count("start", nodeagent_pb2.START_TARGET_SNAPSHOT) == 1 and node.pinned == [""]
    # Every later start of the revision (its standby, a request's) runs the digest the validation
    # resolved, even though the tag has moved since.
    node.digest = "sha256:" + "e2" * 32
    held = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    assert held.source in (scheduler_pb2.CLAIM_SOURCE_NORMAL_START, scheduler_pb2.CLAIM_SOURCE_COLD_START)
    assert len(node.pinned) >= 2 and set(node.pinned[1:]) == {got.image_digest}
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=held.claim_id, gateway_id="gw"), timeout=5)
    # A new revision resolves its image again.
    spec = user_image("byo")
    spec.served_model_name = "acme/Echo-1B-v2"
    updated = (await admin.UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=spec), timeout=5)).function
    assert (updated.revision, updated.state, updated.image_digest) == (2, FunctionState.FUNCTION_STATE_PENDING, "")
    await wait_until(lambda: (f := leader.state.function(fid)) is not None and f.revision == 2
                     and f.state == FunctionState.FUNCTION_STATE_READY, 10, "revision 2 READY")
    assert leader.state.function(fid).image_digest == node.digest  # type: ignore[union-attr]


async def test_a_user_image_that_fails_validation_fails_its_deploy_with_the_nodes_reason(
        leader: Scheduler, node: FakeNode) -> None:
    node.fail_reason = ("i-0: the container exited before it was ready (exit status 3); container output:\n"
                        "Traceback (most recent call last):\nModuleNotFoundError: No module named 'vllm'")
    node.start_delay_s = 0.0
    admin, claims = stubs(leader)
    created = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=user_image("bad")), timeout=5)).function
    assert created.state == FunctionState.FUNCTION_STATE_PENDING
    await wait_until(lambda: (f := leader.state.function(created.id)) is not None
                     and f.state == FunctionState.FUNCTION_STATE_FAILED, 15, "function FAILED")
    got = (await admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=created.id), timeout=5)).function
    assert got.status_message.startswith("deploy of image docker://registry.local/acme/echo:1 failed after 3 attempts: ")
    assert "exit status 3" in got.status_message and "No module named 'vllm'" in got.status_message
    assert got.image_digest == "" and node.count("start") == 3  # never once READY, never a serving start
    assert node.count("start", nodeagent_pb2.START_TARGET_SNAPSHOT) == 3
    code, details = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=created.id, gateway_id="gw"),
                                                      timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "No module named 'vllm'" in details


async def test_a_bad_user_image_reference_is_refused_at_deploy(leader: Scheduler) -> None:
    admin, _ = stubs(leader)
    for image, why in (("docker://registry.local/Acme/echo:1", "lowercase"), ("oci-archive:img.tar", "absolute"),
                       ("registry.local/acme/echo:1", "known transport")):
        code, details = await code_of(admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(
            spec=user_image("refused", image)), timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.image" in details and why in details
    spec = user_image("refused")
    spec.env["LD_PRELOAD"] = "/evil.so"
    code, details = await code_of(admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.env" in details and "LD_PRELOAD" in details


async def test_second_scheduler_takes_over(store: Etcd, etcd_server: EtcdProcess) -> None:
    async with running(store, etcd_server) as first, running(store, etcd_server) as second:
        await wait_until(lambda: first.election.is_leader or second.election.is_leader, 10, "a leader")
        lead, follow = (first, second) if first.election.is_leader else (second, first)
        await wait_until(lambda: follow.election.leader_address == lead.address, 5, "follower knows leader")
        admin, _ = stubs(follow)
        code, details = await code_of(admin.ListFunctions(scheduler_pb2.ListFunctionsRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and f"leader is at {lead.address}" in details
        await lead.stop(grace_s=0.2)
        await wait_until(lambda: follow.election.is_leader, 10, "takeover")
        await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=custom("after")), timeout=5)


async def test_takeover_after_leader_lease_expires(store: Etcd, etcd_server: EtcdProcess) -> None:
    """A leader that dies without resigning: its lease expires and the standby takes over."""
    async with running(store, etcd_server) as first:
        await wait_until(lambda: first.election.is_leader, 10, "first leadership")
        keeper = first.election._keeper
        assert keeper is not None and keeper._task is not None
        # Frozen or killed: no refresh and no new campaign (its election would run again once
        # its own clock says the lease is gone, and could win the key back).
        keeper._task.cancel()
        assert first._election_task is not None
        first._election_task.cancel()
        async with running(store, etcd_server) as second:
            began = time.monotonic()
            await wait_until(lambda: second.election.is_leader, 15, "takeover after expiry")
            assert time.monotonic() - began < 10


def mine(sched: Scheduler, fid: str, *states: int) -> list[Instance]:
    return [i for i in sched.state.instances() if i.function_id == fid and (not states or i.state in states)]


async def test_min_instances_and_queue_depth_scale_out(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    spec = custom("scaled", concurrency=1, max_instances=3)
    spec.policy.min_instances = 1
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    await wait_until(lambda: len(mine(leader, fid, InstanceState.INSTANCE_STATE_RUNNING)) == 1, 10, "min_instances running")
    await claims.ReportQueue(scheduler_pb2.ReportQueueRequest(gateway_id="gw", depths={fid: 5}), timeout=5)
    await wait_until(lambda: len(mine(leader, fid, InstanceState.INSTANCE_STATE_RUNNING)) == 3, 10, "scaled to max")
    await asyncio.sleep(0.5)
    assert len(mine(leader, fid)) == 3 and node.count("start") == 3  # never past max_instances


async def test_idle_scale_in_and_old_revision_drain(leader: Scheduler, node: FakeNode, store: Etcd) -> None:
    admin, claims = stubs(leader)
    spec = custom("shrink", concurrency=1, max_instances=2)
    spec.policy.idle_timeout.FromSeconds(1)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    a = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    b = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    assert a.instance_id != b.instance_id
    # Instance a goes idle (as its nodeagent would report) long ago; b is updated to revision 2's
    # predecessor and keeps its claim, so it must not be drained until released.
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=a.claim_id, gateway_id="gw"), timeout=5)
    got = await store.get(keys.instance_key("node-a", a.instance_id), Instance)
    assert got is not None
    idle = got.value
    idle.state = InstanceState.INSTANCE_STATE_IDLE
    idle.update_time.FromSeconds(int(time.time()) - 60)
    await store.put(keys.instance_key("node-a", a.instance_id), idle)
    await wait_until(lambda: leader.state.instance(a.instance_id) is None, 10, "idle instance stopped")
    spec.policy.concurrency = 2
    await admin.UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=spec), timeout=5)
    await asyncio.sleep(0.5)
    assert leader.state.instance(b.instance_id) is not None  # still claimed: not drained yet
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=b.claim_id, gateway_id="gw"), timeout=5)
    await wait_until(lambda: leader.state.instance(b.instance_id) is None, 10, "old revision drained")
    c = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    inst = leader.state.instance(c.instance_id)
    assert inst is not None and inst.revision == 2


def gpu_fn(name: str, gib: int) -> FunctionSpec:
    return FunctionSpec(name=name, model_dir="/models/echo", resources=Resources(gpu_count=1, gpu_memory_bytes=gib << 30),
                        policy=Policy(snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE, concurrency=1))


async def idle_instance_of(leader: Scheduler, store: Etcd, spec: FunctionSpec) -> str:
    """Creates the function, serves one request on it, and marks its instance IDLE; its id."""
    admin, claims = stubs(leader)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    held = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=10)
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=held.claim_id, gateway_id="gw"), timeout=5)
    got = await store.get(keys.instance_key("node-a", held.instance_id), Instance)
    assert got is not None
    got.value.state = InstanceState.INSTANCE_STATE_IDLE
    got.value.update_time.FromSeconds(int(time.time()))
    await store.put(keys.instance_key("node-a", held.instance_id), got.value)
    await wait_until(lambda: (i := leader.state.instance(held.instance_id)) is not None
                     and i.state == InstanceState.INSTANCE_STATE_IDLE, 5, "idle visible")
    return held.instance_id


async def test_cold_start_evicts_lru_idle_instance(leader: Scheduler, node: FakeNode, store: Etcd) -> None:
    admin, claims = stubs(leader)
    idle = await idle_instance_of(leader, store, gpu_fn("big", 60))
    other = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=gpu_fn("other", 40)), timeout=5)).function.id
    second = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=other, gateway_id="gw"), timeout=10)
    assert second.source == scheduler_pb2.CLAIM_SOURCE_NORMAL_START
    assert node.count("stop") == 1 and leader.state.instance(idle) is None


async def test_a_start_evicts_all_its_victims_at_once(leader: Scheduler, node: FakeNode, store: Etcd) -> None:
    """A 70 GiB start on an 80 GiB GPU holding three idle 25 GiB instances evicts all three in
    parallel: it waits for one eviction, not three in a row."""
    node.stop_delay_s = 0.5
    admin, claims = stubs(leader)
    for name in ("e1", "e2", "e3"):
        await idle_instance_of(leader, store, gpu_fn(name, 25))
    big = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=gpu_fn("huge", 70)), timeout=5)).function.id
    got_big = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=big, gateway_id="gw"), timeout=15)
    assert got_big.source == scheduler_pb2.CLAIM_SOURCE_NORMAL_START
    assert node.count("stop") == 3 and node.stops_in_flight_peak == 3


# --- claims across a failover -----------------------------------------------------------

async def test_new_leader_counts_leases_held_from_the_last_term(store: Etcd, etcd_server: EtcdProcess,
                                                                node: FakeNode) -> None:
    """A grants two claims (concurrency 2, max_instances 1) to a real gateway queue and dies.
    B starts with an empty table; the gateway's next report lists both claims, and a request
    sent into B's grace window finds the instance full instead of a third slot."""
    async with running(store, etcd_server) as a:
        await wait_until(lambda: a.election.is_leader and not a.broker.settling_s(), 10, "A leads")
        async with running(store, etcd_server, claim_adopt_grace_s=1.5) as b:
            admin, _ = stubs(a)
            spec = custom("adopted", concurrency=2, max_instances=1)
            # The scheduler gives up before the gateway does, so no abandoned AcquireClaim
            # is left waiting on the scheduler to take the slot released below.
            spec.policy.queue_timeout.FromSeconds(2)
            fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
            client = GrpcSchedulerClient([a.address, b.address], "gw-adopt", rpc_timeout=2)
            queue = ClaimQueue(client, default_len=10, default_timeout=3)
            reporter = asyncio.create_task(queue.report_forever(0.2))
            info = FunctionInfo(fid, queue_len=10, queue_timeout=3)
            got: list[Claim] = []
            try:
                first, second = got[:] = [await queue.acquire(info, f"r{k}") for k in range(2)]
                iid = first.instance_id
                assert second.instance_id == iid and a.table.in_use(iid) == 2
                await a.stop(grace_s=0.2)
                await wait_until(lambda: b.election.is_leader, 10, "B takes over")
                began = time.monotonic()
                with pytest.raises(QueueTimeout, match="within 2.0s"):
                    await queue.acquire(info, "r-into-grace")
                assert time.monotonic() - began >= 1.9  # it waited out its queue_timeout, not a slot
                assert b.table.in_use(iid) == 2 and node.count("start") == 1
                queue.release(first)
                third = await queue.acquire(info, "r-after-release")
                got.append(third)
                assert (third.instance_id, third.source) == (iid, ClaimSource.WARM)
                assert {h.claim_id for h in queue.held()} == {second.claim_id, third.claim_id}
                await asyncio.sleep(0.5)  # a few more reports: the released claim stays released
                assert b.table.in_use(iid) == 2
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                still = {h.claim_id for h in queue.held()}
                for claim in got:
                    if claim.claim_id in still:
                        queue.release(claim)
                await queue.drain()
                await client.close()


async def test_reported_leases_are_adopted_once_and_never_resurrected(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    spec = custom("reported", concurrency=2, max_instances=1)
    spec.policy.queue_timeout.FromSeconds(1)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    held = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-r"), timeout=10)
    iid = held.instance_id

    async def report(*claim_ids: str, gateway_id: str = "gw-r", instance_id: str = iid) -> None:
        await claims.ReportQueue(scheduler_pb2.ReportQueueRequest(gateway_id=gateway_id, claims=[
            scheduler_pb2.HeldClaim(claim_id=lid, instance_id=instance_id, function_id=fid) for lid in claim_ids]), timeout=5)

    await report(held.claim_id, "c-prev-term")  # one claim granted by an earlier leader
    assert leader.table.in_use(iid) == 2
    code, _ = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Only the gateway that reported it may release it.
    code, details = await code_of(claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(
        claim_id="c-prev-term", gateway_id="gw"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "c-prev-term" in details
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id="c-prev-term", gateway_id="gw-r"), timeout=5)
    third = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw"), timeout=5)
    assert third.instance_id == iid
    await report(held.claim_id, "c-prev-term")  # sent before the release, arriving after it
    assert leader.table.in_use(iid) == 2
    await report("c-ghost", gateway_id="gw-other", instance_id="i-000000000bad")  # no such instance: not counted
    assert len(leader.table) == 2
    # gw-r's next report lists nothing: it released both (its ReleaseClaim was lost).
    await report()
    assert leader.table.in_use(iid) == 1  # the other gateway's claim stays
    code, details = await code_of(claims.ReportQueue(scheduler_pb2.ReportQueueRequest(
        gateway_id="gw-r", claims=[scheduler_pb2.HeldClaim(claim_id="c-x", function_id=fid)]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "claims[0].instance_id" in details
    code, details = await code_of(report("c-x", gateway_id=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "gateway_id" in details


# --- claims belong to a gateway, and go when it goes quiet ---------------------------------

async def test_a_gateway_that_stops_reporting_loses_its_claims_within_the_ttl(
        store: Etcd, etcd_server: EtcdProcess, node: FakeNode) -> None:
    """A real gateway queue holds both slots and reports every 0.2 s; while it reports, the
    claims outlive their 1 s TTL. Its reports stop (the gateway died): within the TTL plus one
    expiry check another gateway gets a slot, where before it waited out its queue timeout."""
    async with running(store, etcd_server, claim_ttl_s=1.0) as sched:
        await wait_until(lambda: sched.election.is_leader and not sched.broker.settling_s(), 10, "leadership")
        admin, claims = stubs(sched)
        spec = custom("silent", concurrency=2, max_instances=1)
        spec.policy.queue_timeout.FromSeconds(5)
        fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
        client = GrpcSchedulerClient([sched.address], "gw-silent", rpc_timeout=2)
        queue = ClaimQueue(client, default_len=10, default_timeout=5)
        info = FunctionInfo(fid, queue_len=10, queue_timeout=5)
        try:
            held = [await queue.acquire(info, f"r{k}") for k in range(2)]
            assert held[0].ttl_seconds == 1.0 and queue.report_period(1.0) == pytest.approx(1 / 3)
            reporter = asyncio.create_task(queue.report_forever(0.2))
            await asyncio.sleep(1.6)  # past the TTL: the reports kept both claims
            assert sched.table.in_use(held[0].instance_id) == 2
            code, _ = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(
                function_id=fid, gateway_id="gw-other"), timeout=0.5))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            reporter.cancel()  # the gateway dies: no report, no release
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            began = time.monotonic()
            got = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-other"),
                                            timeout=5)
            assert got.instance_id == held[0].instance_id and time.monotonic() - began < 1.5
            assert [c.gateway_id for c in [sched.table.get(got.claim_id)] if c] == ["gw-other"]
            assert sched.table.in_use(got.instance_id) == 1  # the silent gateway's two are gone
        finally:
            await client.close()


async def test_claims_and_reports_touch_only_the_callers_own_claims(leader: Scheduler, node: FakeNode) -> None:
    admin, claims = stubs(leader)
    spec = custom("owned", concurrency=2, max_instances=1)
    fid = (await admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=5)).function.id
    mine = await claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-a"), timeout=10)
    iid = mine.instance_id

    def held(claim_id: str, function_id: str = fid) -> scheduler_pb2.HeldClaim:
        return scheduler_pb2.HeldClaim(claim_id=claim_id, instance_id=iid, function_id=function_id)

    # Another gateway can neither release nor report (keep alive) gw-a's claim.
    code, details = await code_of(claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(
        claim_id=mine.claim_id, gateway_id="gw-b"), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and mine.claim_id in details
    code, details = await code_of(claims.ReportQueue(scheduler_pb2.ReportQueueRequest(
        gateway_id="gw-b", depths={fid: 1}, claims=[held("c-b-own"), held(mine.claim_id)]), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED and mine.claim_id in details and "claims[1]" in details
    assert leader.table.get("c-b-own") is None and leader.queues.total(fid) == 0  # refused whole
    # A claim (or a depth) of a function that does not exist is refused, naming it.
    code, details = await code_of(claims.ReportQueue(scheduler_pb2.ReportQueueRequest(
        gateway_id="gw-b", claims=[held("c-made-up", "t/d/none")]), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "c-made-up" in details and "t/d/none" in details
    await claims.ReportQueue(scheduler_pb2.ReportQueueRequest(gateway_id="gw-b", depths={"t/d/none": 9, fid: 2}),
                             timeout=5)
    assert leader.queues.total("t/d/none") == 0 and leader.queues.total(fid) == 2
    await claims.ReportQueue(scheduler_pb2.ReportQueueRequest(gateway_id="gw-b"), timeout=5)
    # A release needs the gateway id, and an id not held here is NOT_FOUND, naming it.
    code, details = await code_of(claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=mine.claim_id),
                                                      timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "gateway_id" in details
    code, details = await code_of(claims.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "gateway_id" in details
    code, details = await code_of(claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(
        claim_id="c-nobody-1", gateway_id="gw-a"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "c-nobody-1" in details
    assert leader.table.in_use(iid) == 1
    await claims.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=mine.claim_id, gateway_id="gw-a"), timeout=5)
    assert leader.table.in_use(iid) == 0
