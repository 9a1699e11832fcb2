"""The scheduler believes only the instance records it asked for (``ClusterState.why_not_believed``):
a node's stolen certificate cannot make up instances, reuse another's id, move one to another
function, or have its start answered with something else; intents survive a leader change and
are forgotten once no node needs them. Snapshots attach only the manifest digest the scheduler
pinned from the node it asked to build them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from services.nodeagent.integrity import attach_digest
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.claimtable import ClaimTable
from services.scheduler.controller import INTENT_GRACE_S, Controller
from services.scheduler.metrics import InstancesCollector
from services.scheduler.nodes_fake import FakeNodeClient
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.starter import Starter, snapshot_usable
from services.scheduler.state import ClusterState, intent_of
from snapwake import errors, keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1.types_pb2 import (
    Function,
    FunctionSpec,
    FunctionState,
    Gpu,
    Instance,
    InstanceState,
    Node,
    Policy,
    Resources,
    Snapshot,
    SnapshotMode,
    SnapshotState,
)

GIB = 1 << 30
RUNNING = InstanceState.INSTANCE_STATE_RUNNING


def _function(name: str = "f") -> Function:
    policy = Policy(concurrency=1, max_instances=2, snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE,
                    idle_timeout=Duration(seconds=60), queue_timeout=Duration(seconds=2),
                    start_timeout=Duration(seconds=10))
    spec = FunctionSpec(tenant="t", namespace="d", name=name, policy=policy,
                        resources=Resources(gpu_count=1, gpu_memory_bytes=10 * GIB))
    return Function(id=f"t/d/{name}", revision=1, spec=spec, state=FunctionState.FUNCTION_STATE_READY)


def _node(name: str = "node-a") -> Node:
    out = Node(name=name, address=f"{name}:7070", gpus=[Gpu(index=0, memory_total_bytes=80 * GIB)])
    out.heartbeat_time.FromNanoseconds(time.time_ns())
    return out


def _instance(iid: str, fn: Function, node: str = "node-a", endpoint: str = "10.6.6.6:9000") -> Instance:
    return Instance(id=iid, function_id=fn.id, revision=fn.revision, node=node, state=RUNNING, endpoint=endpoint,
                    gpu_memory_bytes=10 * GIB)


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 3
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


class Core:
    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd, self.state = etcd, ClusterState(etcd)
        self.nodes = FakeNodeClient(etcd)
        self.table = ClaimTable(time.monotonic, 30.0)
        self.starter = Starter(self.state, self.nodes, self.table, stale_after_s=30.0)
        self.broker = ClaimBroker(self.state, self.starter, self.table)
        self.controller = Controller(self.state, self.starter, self.broker, QueueDepths(time.monotonic),
                                     SnapshotBuilder(self.state, self.starter, 3), 3600.0)

    async def stop(self) -> None:
        self.broker.reset()
        await self.state.stop()


async def test_made_up_and_mismatched_records_are_ignored_counted_and_never_routed_to(
        caplog: pytest.LogCaptureFixture) -> None:
    etcd, fn, other = FakeEtcd(), _function(), _function("other")
    for value, key in ((fn, keys.function_key(fn.id)), (other, keys.function_key(other.id)),
                       (_node(), keys.node_key("node-a")), (_node("node-b"), keys.node_key("node-b"))):
        await etcd.put(key, value)
    asked = _instance("i-00000000000a", other, endpoint="127.0.0.1:7001")  # of ``other``, on node-a
    await etcd.put(keys.intent_key(asked.id), intent_of(asked))
    await etcd.put(keys.instance_key("node-a", asked.id), asked)
    made_up = _instance("i-0000000000ff", fn)  # an id the scheduler never minted
    await etcd.put(keys.instance_key("node-a", made_up.id), made_up)
    core = Core(etcd)
    await core.state.start()
    try:
        assert [i.id for i in core.state.instances()] == [asked.id]
        # Through the watch: the asked id moved to another function, and reused on another node.
        moved = _instance(asked.id, fn)
        await etcd.put(keys.instance_key("node-b", asked.id), _instance(asked.id, fn, node="node-b"))
        await etcd.put(keys.instance_key("node-a", asked.id), moved)
        await _until(lambda: core.state.instance(asked.id) is None, "the moved record dropped")
        with caplog.at_level(logging.WARNING, "services.scheduler.state"):
            for _ in range(3):  # the same forgery again: counted each time, logged once
                made_up.update_time.FromNanoseconds(time.time_ns())
                await etcd.put(keys.instance_key("node-a", made_up.id), made_up)
            await _until(lambda: core.state.ignored_records().get("unknown", 0) == 4, "the count")
        assert sum(made_up.id in r.getMessage() for r in caplog.records) == 1
        assert core.state.ignored_records() == {"unknown": 4, "mismatch": 2}
        assert core.state.instances() == []
        # A request for ``fn`` gets an instance the scheduler started, never the forged endpoint.
        grant = await core.broker.acquire(fn.id, "gw", 5.0)
        assert grant.instance.id not in (made_up.id, asked.id) and grant.instance.endpoint != made_up.endpoint
        assert [(c.op, c.node) for c in core.nodes.calls] == [("start", grant.instance.node)]
        families = {f.name: f for f in InstancesCollector(core.state).collect()}
        counted = {s.labels["reason"]: s.value for s in families["snapwake_scheduler_ignored_instance_records"].samples
                   if s.name.endswith("_total")}
        assert counted == {"unknown": 4.0, "mismatch": 2.0}
    finally:
        await core.stop()


async def test_a_record_seen_before_its_intent_is_believed_when_the_intent_arrives() -> None:
    etcd, fn = FakeEtcd(), _function()
    core, seen = Core(etcd), []
    core.state.subscribe(lambda key, value: seen.append((key, value)))
    await core.state.start()
    try:
        inst = _instance("i-00000000000b", fn)
        await etcd.put(keys.instance_key("node-a", inst.id), inst)  # the intent watch lags behind
        await asyncio.sleep(0.05)
        assert core.state.instance(inst.id) is None
        await etcd.put(keys.intent_key(inst.id), intent_of(inst))
        await _until(lambda: core.state.instance(inst.id) == inst, "believed with its intent")
        assert (keys.instance_key("node-a", inst.id), inst) in seen  # the broker hears of it
    finally:
        await core.stop()


async def test_a_new_leader_believes_what_the_old_one_started_and_nothing_else() -> None:
    etcd, fn = FakeEtcd(), _function()
    await etcd.put(keys.function_key(fn.id), fn)
    await etcd.put(keys.node_key("node-a"), _node())
    old = Core(etcd)
    await old.state.start()
    try:
        started = (await old.starter.start(fn))
        assert started is not None
    finally:
        await old.stop()
    await etcd.put(keys.instance_key("node-a", "i-0000000000ee"), _instance("i-0000000000ee", fn))
    new = Core(etcd)
    await new.state.start()
    try:
        assert [i.id for i in new.state.instances()] == [started.instance.id]
        assert new.state.ignored_records() == {"unknown": 1}
    finally:
        await new.stop()


async def test_a_start_answered_with_another_instance_fails_and_is_not_believed() -> None:
    etcd, fn, other = FakeEtcd(), _function(), _function("other")
    await etcd.put(keys.function_key(fn.id), fn)
    await etcd.put(keys.node_key("node-a"), _node())
    core = Core(etcd)

    async def lying_start(node: Node, instance_id: str, function_id: str, *args: object, **kw: object) -> Instance:
        return _instance(instance_id, other)  # the answer names another function

    core.nodes.start = lying_start  # type: ignore[method-assign]
    await core.state.start()
    try:
        with pytest.raises(errors.StartFailed, match="another instance"):
            await core.starter.start(fn)
        assert core.state.instances() == []
    finally:
        await core.stop()


async def test_intents_no_node_records_are_forgotten_after_the_grace() -> None:
    etcd, fn = FakeEtcd(), _function()
    await etcd.put(keys.function_key(fn.id), fn)
    live, ended, fresh = (_instance(f"i-00000000000{c}", fn) for c in "123")
    old = time.time() - INTENT_GRACE_S - 60
    for inst in (live, ended, fresh):
        intent = intent_of(inst)
        if inst is not fresh:
            intent.create_time.FromSeconds(int(old))
        await etcd.put(keys.intent_key(inst.id), intent)
    await etcd.put(keys.instance_key("node-a", live.id), live)
    core = Core(etcd)
    await core.state.start()
    try:
        functions = {fn.id: fn}
        assert await core.controller.forget_intents(functions, time.time()) == 1
        assert [e.key for e in await etcd.list(keys.INTENTS, Instance)] == [
            keys.intent_key(live.id), keys.intent_key(fresh.id)]
        await _until(lambda: len(core.state.intents()) == 2, "the mirror")
        assert core.state.instance(live.id) == live
    finally:
        await core.stop()


# --- Snapshot records: the manifest digest the scheduler pins -----------------------------
def _arena(name: str = "f") -> Function:
    fn = _function(name)
    fn.state = FunctionState.FUNCTION_STATE_PENDING
    fn.spec.policy.snapshot_mode = SnapshotMode.SNAPSHOT_MODE_ARENA
    return fn


async def _core_building(fn: Function, writes: Callable[[str], Snapshot]) -> Core:
    """A core whose fake node, asked to build ``fn``'s snapshot, stores ``writes(node)`` as the
    record (what a nodeagent's ``_record_snapshot`` does) before it answers."""
    etcd = FakeEtcd()
    await etcd.put(keys.node_key("node-a"), _node("node-a"))  # the builds go there
    await etcd.put(keys.function_key(fn.id), fn)
    core = Core(etcd)
    real_start = core.nodes.start

    async def start(node: Node, instance_id: str, function_id: str, revision: int, *args: Any, **kw: Any) -> Instance:
        got = await real_start(node, instance_id, function_id, revision, *args, **kw)
        await etcd.put(keys.snapshot_key(function_id, revision), writes(node.name))
        return got

    core.nodes.start = start  # type: ignore[method-assign]
    await core.state.start()
    return core


def _ready(fn: Function, digest: str, *holders: str) -> Snapshot:
    return Snapshot(id=keys.snapshot_id(fn.id, fn.revision), function_id=fn.id, revision=fn.revision,
                    state=SnapshotState.SNAPSHOT_STATE_READY, manifest_digest=digest, disk_nodes=list(holders))


async def test_a_build_pins_its_builders_digest_and_a_record_moved_off_it_is_rebuilt() -> None:
    fn = _arena()
    core = await _core_building(fn, lambda node: _ready(fn, "sha256:good", node))
    try:
        await core.controller.builder._build(fn, None)
        pin = core.state.snapshot_pin(fn.id, fn.revision)
        assert pin is not None and pin.manifest_digest == "sha256:good" and list(pin.disk_nodes) == ["node-a"]
        fn.state = FunctionState.FUNCTION_STATE_READY
        assert snapshot_usable(fn, core.state.snapshot(fn.id, fn.revision), pin)
        # Another node's certificate points the shared record at its own copy.
        await core.etcd.put(keys.snapshot_key(fn.id, fn.revision), _ready(fn, "sha256:evil", "node-b"))
        await _until(lambda: core.state.snapshot(fn.id, fn.revision).manifest_digest == "sha256:evil",  # type: ignore[union-attr]
                     "the forged record")
        assert not snapshot_usable(fn, core.state.snapshot(fn.id, fn.revision), pin)  # no standby attaches it
        spawned: list[Callable[[], Awaitable[None]]] = []
        core.controller.builder.reconcile(fn, lambda key, make: spawned.append(make))
        await spawned[0]()
        entry = await core.etcd.get(keys.snapshot_key(fn.id, fn.revision), Snapshot)
        assert entry is not None and entry.value.state == SnapshotState.SNAPSHOT_STATE_CORRUPT  # type: ignore[attr-defined]
        assert core.state.snapshot_pin(fn.id, fn.revision).manifest_digest == "sha256:good"  # type: ignore[union-attr]
    finally:
        await core.stop()


async def test_a_built_record_that_does_not_name_its_builder_is_not_pinned() -> None:
    fn = _arena()
    core = await _core_building(fn, lambda node: _ready(fn, "sha256:evil", "node-b"))  # written over by node-b
    try:
        await core.controller.builder._build(fn, None)
        assert core.state.snapshot_pin(fn.id, fn.revision) is None
        entry = await core.etcd.get(keys.snapshot_key(fn.id, fn.revision), Snapshot)
        assert entry is not None and entry.value.state == SnapshotState.SNAPSHOT_STATE_CORRUPT  # type: ignore[attr-defined]
        assert "node-a" in entry.value.message  # type: ignore[attr-defined]
    finally:
        await core.stop()


async def test_nodes_attach_only_the_pinned_digest() -> None:
    etcd, fn = FakeEtcd(), _arena()
    inst = _instance("i-00000000000d", fn)
    forged = _ready(fn, "sha256:evil", "node-b")
    assert await attach_digest(etcd, inst, forged) == "sha256:evil"  # no pin (tools, older builds): the record's
    await etcd.put(keys.snapshot_pin_key(fn.id, fn.revision), _ready(fn, "sha256:good", "node-a"))
    assert await attach_digest(etcd, inst, forged) == "sha256:good"
    assert await attach_digest(etcd, inst, None) == "sha256:good"
