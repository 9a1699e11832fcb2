"""The scheduler core over FakeEtcd and FakeNodeClient: the etcd mirror, placement and starts,
claims shared by waiters, the controller's scale decisions and snapshot builds.

No etcd, no gRPC: the fake node client writes instance keys into the fake etcd as a nodeagent
would, and ClusterState follows them through the fake's watch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.claimtable import ClaimTable
from services.scheduler.controller import Controller
from services.scheduler.crashloop import CrashLoop
from services.scheduler.nodes import NodeFull, NodeUnreachable, StartRefused, _start_error
from services.scheduler.nodes_base import Nodes
from services.scheduler.nodes_fake import Call, FakeNodeClient, Outcome, fake_digest
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.starter import Starter
from services.scheduler.state import ClusterState, intent_of
from snapwake import errors, keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1.nodeagent_pb2 import StartTarget
from snapwake.v1.scheduler_pb2 import ClaimSource
from snapwake.v1.types_pb2 import (
    Function,
    FunctionSpec,
    FunctionState,
    Gpu,
    Instance,
    InstanceState,
    Node,
    NodeCordon,
    Policy,
    Resources,
    Snapshot,
    SnapshotMode,
    SnapshotState,
)

pytestmark = pytest.mark.timeout(30)
GIB = 1 << 30
RUNNING, STANDBY, SNAPSHOT = (StartTarget.START_TARGET_RUNNING, StartTarget.START_TARGET_STANDBY,
                              StartTarget.START_TARGET_SNAPSHOT)


async def until(check: Callable[[], bool], what: str, limit_s: float = 3.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not true after {limit_s}s"
        await asyncio.sleep(0.01)


def node(name: str = "node-a", gpus: int = 1, gib: int = 80) -> Node:
    out = Node(name=name, address=f"{name}:7070",
               gpus=[Gpu(index=i, memory_total_bytes=gib * GIB) for i in range(gpus)])
    out.heartbeat_time.FromNanoseconds(time.time_ns())
    return out


def function(name: str = "f", *, gib: int = 20, concurrency: int = 1, min_instances: int = 0,
             max_instances: int = 2, standby_per_node: int = 0, mode: int = SnapshotMode.SNAPSHOT_MODE_NONE,
             state: int = FunctionState.FUNCTION_STATE_READY, idle_s: int = 60, queue_s: int = 2) -> Function:
    policy = Policy(concurrency=concurrency, min_instances=min_instances, max_instances=max_instances,
                    standby_per_node=standby_per_node, snapshot_mode=mode,  # type: ignore[arg-type]
                    idle_timeout=Duration(seconds=idle_s), queue_timeout=Duration(seconds=queue_s),
                    start_timeout=Duration(seconds=10))
    spec = FunctionSpec(tenant="t", namespace="d", name=name, policy=policy,
                        resources=Resources(gpu_count=1, gpu_memory_bytes=gib * GIB))
    return Function(id=f"t/d/{name}", revision=1, spec=spec, state=state)  # type: ignore[arg-type]


def instance(iid: str, fn: Function, state: int, node_name: str = "node-a", idle_for_s: float = 0.0) -> Instance:
    inst = Instance(id=iid, function_id=fn.id, revision=fn.revision, node=node_name, gpu_index=0,
                    gpu_memory_bytes=fn.spec.resources.gpu_memory_bytes, state=state,  # type: ignore[arg-type]
                    endpoint="127.0.0.1:9999" if state in (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE) else "")
    inst.update_time.FromNanoseconds(int((time.time() - idle_for_s) * 1e9))
    return inst


def snapshot(fn: Function, state: int) -> Snapshot:
    return Snapshot(id=keys.snapshot_id(fn.id, fn.revision), function_id=fn.id, revision=fn.revision,
                    state=state)  # type: ignore[arg-type]


class Core:
    """The scheduler's pieces as ``Scheduler`` wires them, over the fakes."""

    def __init__(self, snapshot_attempts: int = 3, crashes: CrashLoop | None = None) -> None:
        self.etcd = FakeEtcd()
        self.nodes = FakeNodeClient(self.etcd)
        self.state = ClusterState(self.etcd)
        self.table = ClaimTable(time.monotonic, 30.0)
        self.queues = QueueDepths(time.monotonic)
        self.starter = Starter(self.state, self.nodes, self.table, stale_after_s=30.0)
        self.broker = ClaimBroker(self.state, self.starter, self.table)
        self.builder = SnapshotBuilder(self.state, self.starter, snapshot_attempts)
        self.controller = Controller(self.state, self.starter, self.broker, self.queues, self.builder, 0.05, crashes)

    async def put(self, *values: Message) -> None:
        """Writes values to etcd under their keys and waits until the mirror shows them
        (instances with the intent the scheduler records when it starts one)."""
        for value in values:
            if isinstance(value, Instance):
                await self.etcd.put(keys.intent_key(value.id), intent_of(value))
            await self.etcd.put(_key(value), value)
        await until(lambda: all(self._held(_key(v)) == v for v in values), "the mirror")

    def _held(self, key: str) -> Message | None:
        for mirror in self.state.mirrors.values():
            if key in mirror.items:
                return mirror.items[key][0]
        return None

    async def stored(self, iid: str) -> Instance | None:
        found = [e.value for e in await self.etcd.list(keys.INSTANCES, Instance) if e.value.id == iid]  # type: ignore[attr-defined]
        return found[0] if found else None  # type: ignore[return-value]


def _key(value: Message) -> str:
    if isinstance(value, Function):
        return keys.function_key(value.id)
    if isinstance(value, Node):
        return keys.node_key(value.name)
    if isinstance(value, Instance):
        return keys.instance_key(value.node, value.id)
    if isinstance(value, NodeCordon):
        return keys.cordon_key(value.node)
    assert isinstance(value, Snapshot)
    return keys.snapshot_key(value.function_id, value.revision)


@pytest.fixture
async def core() -> AsyncIterator[Core]:
    c = Core()
    await c.state.start()
    yield c
    await c.controller.stop()
    c.broker.reset()
    await c.state.stop()


def test_the_fake_node_client_has_the_interface() -> None:
    nodes: Nodes = FakeNodeClient()  # checked by mypy; at run time, the methods are there
    assert all(callable(getattr(nodes, name)) for name in Nodes.__dict__ if not name.startswith("_"))


# --- ClusterState ------------------------------------------------------------------------
async def test_state_lists_then_follows_the_watch() -> None:
    etcd, fn = FakeEtcd(), function()
    await etcd.put(keys.function_key(fn.id), fn)
    state, seen = ClusterState(etcd), []
    state.subscribe(lambda key, value: seen.append((key, value is None)))
    await state.start()
    try:
        assert state.function(fn.id) == fn  # listed before start returned
        inst = instance("i-000000000001", fn, InstanceState.INSTANCE_STATE_RUNNING)
        await etcd.put(keys.intent_key(inst.id), intent_of(inst))
        await etcd.put(keys.instance_key(inst.node, inst.id), inst)
        await etcd.delete(keys.function_key(fn.id))
        await until(lambda: state.function(fn.id) is None, "the delete")
        assert state.instance(inst.id) == inst
        assert (keys.instance_key(inst.node, inst.id), False) in seen and (keys.function_key(fn.id), True) in seen
    finally:
        await state.stop()


async def test_state_relists_after_the_watch_breaks() -> None:
    etcd, fn, gone = FakeEtcd(), function(), function("gone")
    await etcd.put(keys.function_key(gone.id), gone)
    state = ClusterState(etcd)
    await state.start()
    try:
        etcd.down = True  # every watch breaks
        etcd.down = False
        # Written while the watches were down: only a relist can show these.
        await etcd.put(keys.function_key(fn.id), fn)
        await etcd.delete(keys.function_key(gone.id))
        await until(lambda: state.function(fn.id) == fn and state.function(gone.id) is None, "relist")
        later = instance("i-000000000002", fn, InstanceState.INSTANCE_STATE_IDLE)
        await etcd.put(keys.intent_key(later.id), intent_of(later))
        await etcd.put(keys.instance_key(later.node, later.id), later)
        await until(lambda: state.instance(later.id) == later, "the watch after the relist")
    finally:
        await state.stop()


async def test_an_instance_reported_by_rpc_counts_until_the_watch_shows_it(core: Core) -> None:
    fn = function()
    reported = instance("i-000000000003", fn, InstanceState.INSTANCE_STATE_RUNNING)
    await core.state.record_intent(reported)  # as the starter does before it asks the node
    core.state.note_started(reported)
    assert core.state.instance(reported.id) == reported
    stopped = instance(reported.id, fn, InstanceState.INSTANCE_STATE_STOPPING)
    await core.put(stopped)
    assert core.state.instance(reported.id) == stopped  # the watch, newer, wins


# --- Starter -----------------------------------------------------------------------------
async def test_a_start_places_on_a_node_and_records_the_running_instance(core: Core) -> None:
    fn = function()
    await core.put(node(), fn)
    result = await core.starter.start(fn)
    assert result is not None and result.source == ClaimSource.CLAIM_SOURCE_NORMAL_START
    inst = result.instance
    assert core.nodes.calls == [Call("start", "node-a", inst.id, RUNNING)]
    assert (inst.state, inst.node, inst.gpu_index) == (InstanceState.INSTANCE_STATE_RUNNING, "node-a", 0)
    assert core.state.instance(inst.id) is not None and not core.starter.pending
    stored = await core.stored(inst.id)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_RUNNING


@pytest.mark.parametrize(("snapshot_state", "op", "source"), [
    (SnapshotState.SNAPSHOT_STATE_READY, "restore", ClaimSource.CLAIM_SOURCE_COLD_START),
    # A corrupt snapshot is never attached: a normal start instead.
    (SnapshotState.SNAPSHOT_STATE_CORRUPT, "start", ClaimSource.CLAIM_SOURCE_NORMAL_START),
])
async def test_a_standby_is_restored_only_while_its_snapshot_is_usable(
        core: Core, snapshot_state: int, op: str, source: int) -> None:
    fn = function(mode=SnapshotMode.SNAPSHOT_MODE_ARENA, standby_per_node=1)
    standby = instance("i-00000000000a", fn, InstanceState.INSTANCE_STATE_STANDBY)
    await core.put(node(), fn, snapshot(fn, snapshot_state), standby)
    result = await core.starter.start(fn)
    assert result is not None and result.source == source
    assert [c.op for c in core.nodes.calls] == [op]
    assert (result.instance.id == standby.id) == (op == "restore")
    stored = await core.stored(result.instance.id)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_RUNNING


@pytest.mark.parametrize(("standby_gpu", "busy_gpu", "op", "lands_on"), [
    (1, None, "restore", 1),  # both GPUs empty: restored on its own GPU 1, not the first-fit GPU 0
    (0, 0, "start", 1),       # its GPU is held by a busy instance: a normal start on the GPU with room
])
async def test_a_standby_restores_only_onto_the_gpu_it_was_checkpointed_on(
        core: Core, standby_gpu: int, busy_gpu: int | None, op: str, lands_on: int) -> None:
    fn = function(gib=50, mode=SnapshotMode.SNAPSHOT_MODE_ARENA, standby_per_node=1)
    other = function("g", gib=50)
    standby = instance("i-00000000000a", fn, InstanceState.INSTANCE_STATE_STANDBY)
    standby.gpu_index = standby_gpu
    busy = instance("i-00000000000b", other, InstanceState.INSTANCE_STATE_RUNNING)
    busy.gpu_index = busy_gpu or 0
    await core.put(node(gpus=2), fn, other, snapshot(fn, SnapshotState.SNAPSHOT_STATE_READY), standby,
                   *([busy] if busy_gpu is not None else []))
    result = await core.starter.start(fn)
    assert result is not None
    assert [c.op for c in core.nodes.calls] == [op]
    assert result.instance.gpu_index == lands_on
    assert (result.instance.id == standby.id) == (op == "restore")


@pytest.mark.parametrize(("standby_gpu", "victim", "op"), [
    (0, "lru", "restore"),     # the least recently used idles on the standby's GPU
    (1, "recent", "restore"),  # a restore after evicting a more recent one beats a normal start
    (None, "lru", "start"),    # no standby: least recently used, then a normal start
])
async def test_a_full_node_evicts_least_recently_used_on_the_gpus_a_standby_can_restore_onto(
        core: Core, standby_gpu: int | None, victim: str, op: str) -> None:
    fn = function(gib=50, mode=SnapshotMode.SNAPSHOT_MODE_ARENA, standby_per_node=1)
    others = [function(name, gib=50) for name in ("old", "new")]
    standby = instance("i-00000000000a", fn, InstanceState.INSTANCE_STATE_STANDBY)
    standby.gpu_index = standby_gpu or 0
    lru = instance("i-00000000000b", others[0], InstanceState.INSTANCE_STATE_IDLE, idle_for_s=100)
    recent = instance("i-00000000000c", others[1], InstanceState.INSTANCE_STATE_IDLE, idle_for_s=10)
    recent.gpu_index = 1
    await core.put(node(gpus=2), fn, *others, snapshot(fn, SnapshotState.SNAPSHOT_STATE_READY), lru, recent,
                   *([standby] if standby_gpu is not None else []))
    result = await core.starter.start(fn)
    evicted = lru if victim == "lru" else recent
    assert result is not None and result.instance.gpu_index == evicted.gpu_index
    assert [(c.op, c.instance_id) for c in core.nodes.calls] == [
        ("stop", evicted.id), (op, standby.id if op == "restore" else result.instance.id)]


async def test_no_room_is_none_and_calls_no_node(core: Core) -> None:
    fn = function(gib=100)
    await core.put(node(gib=80), fn)
    assert await core.starter.start(fn) is None
    assert core.nodes.calls == []


async def test_an_unreachable_node_is_left_out_of_the_next_placement(core: Core) -> None:
    fn = function()
    await core.put(node("node-a"), node("node-b"), fn)
    core.nodes.script("start", Outcome(NodeUnreachable("no answer")))
    assert await core.starter.start(fn) is None
    first = core.nodes.calls[0].node
    assert not core.nodes.reachable(first)
    result = await core.starter.start(fn)
    assert result is not None and result.instance.node != first
    assert await core.stored(core.nodes.calls[0].instance_id) is None  # nothing was started there


async def test_a_failed_start_raises_and_leaves_the_instance_failed(core: Core) -> None:
    fn = function()
    await core.put(node(), fn)
    core.nodes.script("start", Outcome(errors.StartFailed("model has no config.json")))
    with pytest.raises(errors.StartFailed, match="config.json"):
        await core.starter.start(fn)
    assert not core.starter.pending
    stored = await core.stored(core.nodes.calls[0].instance_id)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED and "config.json" in stored.message


async def test_a_start_evicts_the_least_recently_idle_instances(core: Core) -> None:
    small, big = function("small", max_instances=4), function("big", gib=40)
    idle = [instance(f"i-00000000001{n}", small, InstanceState.INSTANCE_STATE_IDLE, idle_for_s=100 - n) for n in range(4)]
    await core.put(node(gib=80), small, big, *idle)
    result = await core.starter.start(big)
    assert result is not None
    stops = sorted(c.instance_id for c in core.nodes.calls if c.op == "stop")
    assert stops == [idle[0].id, idle[1].id]  # idle longest, and just enough room
    assert [c.op for c in core.nodes.calls][-1] == "start"
    assert await core.stored(idle[0].id) is None and await core.stored(idle[3].id) is not None


async def test_a_cordoned_node_gets_no_new_instance(core: Core) -> None:
    fn = function(max_instances=4)
    await core.put(node("node-a"), node("node-b"), fn, NodeCordon(node="node-a"))
    for _ in range(2):
        result = await core.starter.start(fn)
        assert result is not None and result.instance.node == "node-b"
    await core.put(NodeCordon(node="node-b", drain=True))
    assert await core.starter.start(fn) is None
    assert [c.node for c in core.nodes.calls] == ["node-b", "node-b"]


async def test_a_drained_node_loses_its_instances_once_they_serve_no_request(core: Core) -> None:
    fn = function(concurrency=1, max_instances=1)
    busy = instance("i-000000000060", fn, InstanceState.INSTANCE_STATE_RUNNING)
    await core.put(node("node-a"), node("node-b"), fn, busy)
    held = await core.broker.acquire(fn.id, "gw", timeout_s=1)
    assert held.instance.id == busy.id
    await core.put(NodeCordon(node="node-a", drain=True))
    core.controller.reconcile()
    await asyncio.sleep(0.05)
    assert core.nodes.count("stop") == 0  # a request is in flight on it
    # It no longer counts (even at max_instances): its claim in use asks for a replacement, which
    # starts on the other node, and the next request is served there, not on the drained one.
    moved = await core.broker.acquire(fn.id, "gw", timeout_s=1)
    assert moved.instance.node == "node-b" and core.nodes.count("start") == 1
    core.broker.release(held.claim.claim_id, "gw", instance_failed=False)
    core.controller.reconcile()
    await until(lambda: core.nodes.count("stop") == 1, "the drained instance stopped")
    assert [c.instance_id for c in core.nodes.calls if c.op == "stop"] == [busy.id]


async def test_a_drained_instance_serves_until_its_replacement_does(core: Core) -> None:
    fn = function(concurrency=1, min_instances=1, max_instances=1)
    old = instance("i-000000000070", fn, InstanceState.INSTANCE_STATE_IDLE)
    await core.put(node("node-a"), node("node-b", gib=10), fn, old, NodeCordon(node="node-a", drain=True))
    core.controller.reconcile()  # no room for a replacement on node-b
    await asyncio.sleep(0.1)
    grant = await core.broker.acquire(fn.id, "gw", timeout_s=1)
    assert grant.instance.id == old.id  # the only instance still serves
    core.broker.release(grant.claim.claim_id, "gw", instance_failed=False)
    core.controller.reconcile()
    await asyncio.sleep(0.1)
    assert core.nodes.count("stop") == 0
    await core.put(node("node-b"))  # room now: the replacement starts, then the old one goes
    core.controller.start()  # its loop, every 50 ms
    await until(lambda: core.nodes.count("start") == 1, "the replacement started")
    await until(lambda: any(i.node == "node-b" and i.state == InstanceState.INSTANCE_STATE_RUNNING
                            for i in core.state.instances()), "the replacement serving")
    await until(lambda: core.nodes.count("stop") == 1, "the drained instance stopped")
    assert [c.instance_id for c in core.nodes.calls if c.op == "stop"] == [old.id]


# --- ClaimBroker -------------------------------------------------------------------------
async def test_a_waiter_is_told_to_ask_again_when_leadership_changes(core: Core) -> None:
    fn = function(gib=100)  # no node has room: the request waits
    await core.put(node(gib=80), fn)
    waiter = asyncio.create_task(core.broker.acquire(fn.id, "gw", timeout_s=10))
    await asyncio.sleep(0.1)
    core.broker.reset()  # deposed (or re-elected): the waiter's term is over
    with pytest.raises(errors.Unavailable, match="leadership changed"):
        await asyncio.wait_for(waiter, 1)


async def test_a_warm_instance_is_granted_without_a_start(core: Core) -> None:
    fn = function(concurrency=2)
    warm = instance("i-000000000020", fn, InstanceState.INSTANCE_STATE_IDLE)
    await core.put(node(), fn, warm)
    grant = await core.broker.acquire(fn.id, "gw", timeout_s=1)
    assert (grant.instance.id, grant.source) == (warm.id, ClaimSource.CLAIM_SOURCE_WARM)
    assert core.table.in_use(warm.id) == 1 and core.nodes.calls == []


async def test_concurrent_waiters_share_one_start(core: Core) -> None:
    fn = function(concurrency=3)
    await core.put(node(), fn)
    core.nodes.script("start", Outcome(delay_s=0.05))
    grants = await asyncio.gather(*(core.broker.acquire(fn.id, f"gw-{n}", timeout_s=2) for n in range(3)))
    assert core.nodes.count("start") == 1
    assert len({g.instance.id for g in grants}) == 1 and len({g.claim.claim_id for g in grants}) == 3
    assert {g.source for g in grants} == {ClaimSource.CLAIM_SOURCE_NORMAL_START}


async def test_a_failed_start_fails_every_waiter_at_once(core: Core) -> None:
    fn = function(concurrency=3)
    await core.put(node(), fn)
    core.nodes.script("start", Outcome(errors.StartFailed("out of memory"), delay_s=0.05))
    began = time.monotonic()
    results = await asyncio.gather(*(core.broker.acquire(fn.id, "gw", timeout_s=2) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, errors.StartFailed) and "out of memory" in r.message for r in results)
    assert core.nodes.count("start") == 1 and time.monotonic() - began < 1


async def test_at_max_instances_a_waiter_gets_a_released_slot_or_times_out(core: Core) -> None:
    fn = function(concurrency=1, max_instances=1)
    await core.put(node(), fn, instance("i-000000000030", fn, InstanceState.INSTANCE_STATE_RUNNING))
    first = await core.broker.acquire(fn.id, "gw", timeout_s=1)
    with pytest.raises(errors.DeadlineExceeded, match="no instance of t/d/f became free"):
        await core.broker.acquire(fn.id, "gw", timeout_s=0.2)
    waiting = asyncio.ensure_future(core.broker.acquire(fn.id, "gw", timeout_s=2))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    core.broker.release(first.claim.claim_id, "gw", instance_failed=False)
    second = await waiting
    assert second.instance.id == first.instance.id and core.nodes.calls == []


async def test_claims_on_an_instance_that_ended_are_dropped(core: Core) -> None:
    fn = function(concurrency=2)
    inst = instance("i-000000000031", fn, InstanceState.INSTANCE_STATE_RUNNING)
    await core.put(node(), fn, inst)
    await core.broker.acquire(fn.id, "gw", timeout_s=1)
    assert core.table.in_use(inst.id) == 1
    await core.put(instance(inst.id, fn, InstanceState.INSTANCE_STATE_FAILED))
    assert core.table.in_use(inst.id) == 0


@pytest.mark.parametrize(("state", "error"), [
    (None, errors.NotFound), (FunctionState.FUNCTION_STATE_FAILED, errors.FailedPrecondition)])
async def test_acquire_on_a_missing_or_failed_function(core: Core, state: int | None, error: type) -> None:
    if state is not None:
        await core.put(function(state=state))
    with pytest.raises(error):
        await core.broker.acquire("t/d/f", "gw", timeout_s=0.2)


async def test_a_new_leader_grants_nothing_while_settling(core: Core) -> None:
    fn = function()
    await core.put(node(), fn, instance("i-000000000032", fn, InstanceState.INSTANCE_STATE_IDLE))
    core.broker.settle(5.0)
    with pytest.raises(errors.DeadlineExceeded, match="collecting the gateways' claims"):
        await core.broker.acquire(fn.id, "gw", timeout_s=0.1)
    assert core.nodes.calls == [] and len(core.table) == 0


# --- Controller --------------------------------------------------------------------------
async def test_min_instances_are_started(core: Core) -> None:
    fn = function(min_instances=1)
    await core.put(node(), fn)
    core.controller.reconcile()
    await until(lambda: core.nodes.count("start", RUNNING) == 1, "a start")
    core.controller.reconcile()  # the start is in flight or counted: no second one
    await until(lambda: len(core.state.instances()) == 1, "the instance")
    assert core.nodes.count("start") == 1


async def test_queued_requests_scale_out_one_start_at_a_time(core: Core) -> None:
    fn = function(max_instances=4)
    await core.put(node(), fn, instance("i-000000000040", fn, InstanceState.INSTANCE_STATE_RUNNING))
    core.queues.report("gw", {fn.id: 3})
    core.nodes.script("start", Outcome(delay_s=0.2))
    core.controller.reconcile()
    core.controller.reconcile()
    await until(lambda: core.nodes.count("start") == 1, "a start")
    await asyncio.sleep(0.05)
    assert core.nodes.count("start") == 1


@pytest.mark.parametrize(("standby_per_node", "op", "after"), [
    (0, "stop", None),
    (1, "suspend", InstanceState.INSTANCE_STATE_STANDBY),  # parkable: it becomes the node's standby
])
async def test_an_instance_idle_past_its_timeout_is_stopped_or_parked(
        core: Core, standby_per_node: int, op: str, after: int | None) -> None:
    fn = function(idle_s=1, standby_per_node=standby_per_node, mode=SnapshotMode.SNAPSHOT_MODE_ARENA)
    idle = instance("i-000000000050", fn, InstanceState.INSTANCE_STATE_IDLE, idle_for_s=60)
    await core.put(node(), fn, snapshot(fn, SnapshotState.SNAPSHOT_STATE_READY), idle)
    core.controller.reconcile()
    await until(lambda: core.nodes.count(op) == 1, op)
    await until(lambda: (i := core.state.instance(idle.id)) is None and after is None
                or i is not None and i.state == after, "the instance's new state")
    assert [c.op for c in core.nodes.calls] == [op]


async def test_standbys_are_spread_over_the_gpus_of_a_node(core: Core) -> None:
    fns = [function(name, gib=20, standby_per_node=1, mode=SnapshotMode.SNAPSHOT_MODE_ARENA) for name in "abcd"]
    await core.put(node(gpus=2), *fns, *(snapshot(f, SnapshotState.SNAPSHOT_STATE_READY) for f in fns))
    # Several at a time: a standby start holds its slice until it checkpoints.
    await until(lambda: core.controller.reconcile() or sum(
        i.state == InstanceState.INSTANCE_STATE_STANDBY for i in core.state.instances()) == 4, "four standbys")
    on_gpu = sorted(i.gpu_index for i in core.state.instances() if i.state == InstanceState.INSTANCE_STATE_STANDBY)
    assert on_gpu == [0, 0, 1, 1]


async def test_a_node_without_host_memory_for_a_standby_is_not_asked_again_at_once(core: Core) -> None:
    fn = function(standby_per_node=1, mode=SnapshotMode.SNAPSHOT_MODE_PROCESS)
    await core.put(node(), fn)
    core.nodes.script("start", Outcome(NodeFull("node node-a: host memory: a standby needs ~20.4 GiB, "
                                                "40.8 GiB of 51.2 GiB committed")))
    core.controller.reconcile()
    await until(lambda: core.nodes.count("start", STANDBY) == 1 and not core.controller._ops, "the refused start")
    for _ in range(3):  # later passes leave that node alone for a while
        core.controller.reconcile()
        await asyncio.sleep(0.02)
    assert core.nodes.count("start") == 1
    # Ended, not failed: no crash is counted and the function stays READY.
    assert all(i.state == InstanceState.INSTANCE_STATE_ENDED for i in core.state.instances())
    assert (f := core.state.function(fn.id)) is not None and f.state == FunctionState.FUNCTION_STATE_READY


@pytest.mark.parametrize(("err", "want"), [
    (errors.Unavailable("connection refused"), NodeUnreachable),
    (errors.InvalidArgument("spec.image: bad"), StartRefused),
    (errors.ResourceExhausted("host memory: a standby of i-1 needs ~20.0 GiB"), NodeFull),
    (errors.StartFailed("the container exited"), errors.StartFailed),
])
def test_what_a_node_answers_to_a_start_is_told_apart(err: errors.SnapwakeError, want: type) -> None:
    got = _start_error(node(), "start of i-1", err)
    assert type(got) is want and got.message == f"node node-a: start of i-1: {errors.grpc_details(err)}"


async def test_a_park_the_node_refuses_stops_the_instance_instead(core: Core) -> None:
    fn = function(idle_s=1, standby_per_node=1, mode=SnapshotMode.SNAPSHOT_MODE_PROCESS)
    idle = instance("i-000000000053", fn, InstanceState.INSTANCE_STATE_IDLE, idle_for_s=60)
    await core.put(node(), fn, idle)
    core.nodes.script("suspend", Outcome(errors.ResourceExhausted("host memory: a standby of i-000000000053 "
                                                                  "needs ~60.0 GiB")))
    core.controller.reconcile()
    await until(lambda: core.state.instance(idle.id) is None, "the stop")  # its GPU slice is free again
    assert [c.op for c in core.nodes.calls][:2] == ["suspend", "stop"]


async def test_a_fresh_idle_instance_and_min_instances_are_kept(core: Core) -> None:
    fn = function(idle_s=60, min_instances=1)
    await core.put(node(), fn, instance("i-000000000051", fn, InstanceState.INSTANCE_STATE_IDLE, idle_for_s=600),
                   instance("i-000000000052", fn, InstanceState.INSTANCE_STATE_IDLE, idle_for_s=5))
    core.controller.reconcile()
    await until(lambda: core.nodes.count("stop") == 1, "a stop")
    assert core.nodes.calls == [Call("stop", "node-a", "i-000000000051")]
    core.controller.reconcile()
    await asyncio.sleep(0.05)
    assert core.nodes.count("stop") == 1  # the one left is fresh, and min_instances wants it


async def test_instances_of_a_deleted_function_are_stopped(core: Core) -> None:
    orphan = instance("i-000000000060", function("deleted"), InstanceState.INSTANCE_STATE_RUNNING)
    await core.put(node(), orphan)
    core.controller.reconcile()
    await until(lambda: core.state.instance(orphan.id) is None, "the stop")
    assert core.nodes.calls == [Call("stop", "node-a", orphan.id)]


# --- SnapshotBuilder ---------------------------------------------------------------------
def spawner(tasks: list[asyncio.Task[None]]) -> Callable[[str, Callable[[], Awaitable[None]]], None]:
    async def run(make: Callable[[], Awaitable[None]]) -> None:
        await make()

    return lambda key, make: tasks.append(asyncio.ensure_future(run(make)))


async def build_once(core: Core, fn: Function) -> None:
    tasks: list[asyncio.Task[None]] = []
    core.builder.reconcile(core.state.function(fn.id) or fn, spawner(tasks))
    await asyncio.gather(*tasks)


async def test_a_pending_function_builds_its_snapshot_then_turns_ready(core: Core) -> None:
    fn = function(mode=SnapshotMode.SNAPSHOT_MODE_ARENA, state=FunctionState.FUNCTION_STATE_PENDING)
    await core.put(node(), fn)
    await build_once(core, fn)
    assert core.nodes.count("start", SNAPSHOT) == 1
    await until(lambda: (s := core.state.snapshot(fn.id, 1)) is not None
                and s.state == SnapshotState.SNAPSHOT_STATE_READY, "the READY snapshot")
    assert core.state.snapshot(fn.id, 1).attempts == 1  # type: ignore[union-attr]
    await build_once(core, fn)
    await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_READY,  # type: ignore[union-attr]
                "the READY function")
    assert core.nodes.count("start") == 1


async def test_failed_builds_are_retried_then_the_function_fails() -> None:
    core = Core(snapshot_attempts=2)
    await core.state.start()
    try:
        fn = function(mode=SnapshotMode.SNAPSHOT_MODE_ARENA, state=FunctionState.FUNCTION_STATE_PENDING)
        await core.put(node(), fn)
        core.nodes.script("start", *[Outcome(errors.StartFailed("weights unreadable"))] * 2)
        for attempt in (1, 2):
            await build_once(core, fn)
            await until(lambda a=attempt: (s := core.state.snapshot(fn.id, 1)) is not None  # type: ignore[misc]
                        and s.attempts == a and s.state == SnapshotState.SNAPSHOT_STATE_FAILED, f"attempt {attempt}")
            assert "weights unreadable" in core.state.snapshot(fn.id, 1).message  # type: ignore[union-attr]
        await build_once(core, fn)
        await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_FAILED,  # type: ignore[union-attr]
                    "the FAILED function")
        message = core.state.function(fn.id).status_message  # type: ignore[union-attr]
        assert "after 2 attempts" in message and "weights unreadable" in message
        assert core.nodes.count("start", SNAPSHOT) == 2
    finally:
        await core.state.stop()


# --- user images: validated at deploy, pinned to a digest; failing revisions stop restarting --
def user_function(name: str = "u", **kwargs: object) -> Function:
    fn = function(name, mode=SnapshotMode.SNAPSHOT_MODE_PROCESS, state=FunctionState.FUNCTION_STATE_PENDING,
                  **kwargs)  # type: ignore[arg-type]
    fn.spec.image = "registry.local/acme/llm:1"
    return fn


async def test_a_user_image_is_validated_then_every_start_is_pinned_to_its_digest(core: Core) -> None:
    fn = user_function()
    await core.put(node(), fn)
    await build_once(core, fn)
    digest = fake_digest(fn.spec.image)
    assert [(c.target, c.image_digest) for c in core.nodes.calls] == [(SNAPSHOT, "")]  # it resolves the digest
    await until(lambda: core.state.function(fn.id).image_digest == digest, "the pinned digest")  # type: ignore[union-attr]
    await until(lambda: (s := core.state.snapshot(fn.id, 1)) is not None
                and s.state == SnapshotState.SNAPSHOT_STATE_READY, "the validated revision")
    await build_once(core, fn)
    await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_READY,  # type: ignore[union-attr]
                "the READY function")
    ready = core.state.function(fn.id)
    assert ready is not None and await core.starter.start(ready) is not None
    assert core.nodes.calls[-1] == Call("start", "node-a", core.nodes.calls[-1].instance_id, RUNNING, digest)


async def test_a_user_image_the_node_refuses_fails_its_deploy_without_a_retry(core: Core) -> None:
    fn = user_function()
    await core.put(node(), fn)
    core.nodes.script("start", Outcome(StartRefused("node node-a: start of i-1: manifest unknown: "
                                                    "registry.local/acme/llm:1")))
    await build_once(core, fn)
    await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_FAILED,  # type: ignore[union-attr]
                "the FAILED function")
    message = core.state.function(fn.id).status_message  # type: ignore[union-attr]
    assert message.startswith("deploy of image registry.local/acme/llm:1 failed after 1 attempt: ")
    assert "manifest unknown" in message and core.nodes.count("start") == 1


async def test_a_revision_whose_starts_keep_failing_is_not_restarted_forever() -> None:
    core = Core(crashes=CrashLoop(limit=3, window_s=60, base_backoff_s=0.05))
    await core.state.start()
    try:
        fn = function("crashy", min_instances=1)
        core.nodes.script("start", *[Outcome(errors.StartFailed("i-x: the container exited before it was ready "
                                                                "(exit status 3)"))] * 10)
        await core.put(node(), fn)
        core.controller.start()
        await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_FAILED,  # type: ignore[union-attr]
                    "the FAILED function")
        message = core.state.function(fn.id).status_message  # type: ignore[union-attr]
        assert message.startswith("revision 1: 3 instances failed within 60s") and "exit status 3" in message
        starts = core.nodes.count("start")
        await asyncio.sleep(0.3)
        assert starts == core.nodes.count("start") == 3  # and none after
    finally:
        await core.controller.stop()
        await core.state.stop()


async def test_instances_that_die_later_count_and_restarts_back_off() -> None:
    core = Core(crashes=CrashLoop(limit=2, window_s=60, base_backoff_s=0.3))
    await core.state.start()
    try:
        fn = function("dies", min_instances=1)
        await core.put(node(), fn)
        core.controller.start()

        async def running_one() -> Instance:
            await until(lambda: any(i.state == InstanceState.INSTANCE_STATE_RUNNING for i in core.state.instances()),
                        "a running instance")
            return next(i for i in core.state.instances() if i.state == InstanceState.INSTANCE_STATE_RUNNING)

        async def dies(inst: Instance) -> None:  # what its node writes when the container exits
            inst.state, inst.message = InstanceState.INSTANCE_STATE_FAILED, "container exited unexpectedly (exit status 137)"  # type: ignore[assignment]
            await core.put(inst)

        await dies(await running_one())
        died_at = time.monotonic()
        second = await running_one()
        assert time.monotonic() - died_at >= 0.25  # backed off before starting again
        assert core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_READY  # type: ignore[union-attr]
        await dies(second)
        await until(lambda: core.state.function(fn.id).state == FunctionState.FUNCTION_STATE_FAILED,  # type: ignore[union-attr]
                    "the FAILED function")
        assert "exit status 137" in core.state.function(fn.id).status_message  # type: ignore[union-attr]
        assert core.nodes.count("start") == 2
    finally:
        await core.controller.stop()
        await core.state.stop()
