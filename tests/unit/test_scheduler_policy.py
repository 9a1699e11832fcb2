"""Placement plugins, the framework and eviction, as tables."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.scheduler.policy import (
    ClusterView,
    CycleState,
    GpuSlice,
    NodeReady,
    NodeSchedulable,
    Request,
    SnapshotLocality,
    Spread,
    default_filters,
    default_scores,
    schedule,
)
from services.scheduler.policy.eviction import GpuRoom, plan_eviction
from snapwake.v1.types_pb2 import Gpu, Instance, InstanceState, Node

GiB = 1 << 30


def node(name: str, *gpus_gib: int, cached: tuple[str, ...] = (), heartbeat: float | None = None,
         address: str = "127.0.0.1:1") -> Node:
    n = Node(name=name, address=address, cached_snapshots=list(cached),
             gpus=[Gpu(index=i, memory_total_bytes=g * GiB) for i, g in enumerate(gpus_gib)])
    if heartbeat is not None:
        n.heartbeat_time.FromNanoseconds(int(heartbeat * 1e9))
    return n


def inst(iid: str, node_name: str, gpu: int, gib: int, state: int = InstanceState.INSTANCE_STATE_RUNNING,
         fid: str = "t/d/other", idle_since: float = 0.0) -> Instance:
    i = Instance(id=iid, function_id=fid, node=node_name, gpu_index=gpu, gpu_memory_bytes=gib * GiB, state=state)
    i.update_time.CopyFrom(Timestamp(seconds=int(idle_since)))
    return i


def req(gib: int = 20, gpus: int = 1, fid: str = "t/d/f", now: float = 1000.0) -> Request:
    return Request(fid, 1, gpus, gib * GiB, f"{fid}@1", now)


@pytest.mark.parametrize(("n", "instances", "request_", "fits", "gpu"), [
    (node("a", 80), [], req(20), True, 0),
    (node("a", 80), [inst("x", "a", 0, 70)], req(20), False, None),
    (node("a", 80), [inst("x", "a", 0, 60)], req(20), True, 0),  # exactly full is allowed
    (node("a", 80), [inst("x", "a", 0, 70, InstanceState.INSTANCE_STATE_STANDBY)], req(20), True, 0),  # standby: 0 GPU
    (node("a", 80), [inst("x", "a", 0, 70, InstanceState.INSTANCE_STATE_ENDED)], req(20), True, 0),
    (node("a", 80, 80), [inst("x", "a", 0, 50)], req(20), True, 0),  # tightest fit
    (node("a", 80, 80), [inst("x", "a", 0, 70)], req(20), True, 1),
    (node("a"), [], req(20), False, None),  # CPU-only node, GPU function
    (node("a"), [], req(0, gpus=0), True, -1),  # CPU-only node, CPU function
    (node("a", 80), [inst("x", "b", 0, 70)], req(20), True, 0),  # other node's instance
])
def test_gpu_slice(n: Node, instances: list[Instance], request_: Request, fits: bool, gpu: int | None) -> None:
    state = CycleState()
    status = GpuSlice().filter(state, request_, n, ClusterView((n,), tuple(instances)))
    assert status.ok is fits
    if fits:
        assert state.gpu_by_node[n.name] == gpu
    else:
        assert status.message


def test_gpu_slice_respects_reported_reservation() -> None:
    n = node("a", 80)
    n.gpus[0].memory_reserved_bytes = 70 * GiB
    assert not GpuSlice().filter(CycleState(), req(20), n, ClusterView((n,), ())).ok


@pytest.mark.parametrize(("n", "ok"), [
    (node("a", 80, heartbeat=995.0), True),
    (node("a", 80, heartbeat=900.0), False),
    (node("a", 80), True),  # no heartbeat reported yet: its etcd lease vouches for it
    (node("a", 80, address=""), False),
])
def test_node_ready(n: Node, ok: bool) -> None:
    assert NodeReady(30.0).filter(CycleState(), req(), n, ClusterView((n,), ())).ok is ok


@pytest.mark.parametrize(("cordoned", "ok"), [
    (frozenset(), True),
    (frozenset({"b"}), True),  # another node's cordon
    (frozenset({"a"}), False),
    (frozenset({"a", "b"}), False),
])
def test_node_schedulable(cordoned: frozenset[str], ok: bool) -> None:
    n = node("a", 80)
    status = NodeSchedulable().filter(CycleState(), req(), n, ClusterView((n,), (), cordoned))
    assert status.ok is ok and (ok or status.message == "cordoned")


def test_framework_names_a_cordoned_node() -> None:
    a, b = node("a", 80), node("b", 80)
    status, placement = schedule(req(), ClusterView((a, b), (), frozenset({"a"})), default_filters(30.0),
                                 default_scores())
    assert placement is not None and placement.node.name == "b"
    status, placement = schedule(req(), ClusterView((a,), (), frozenset({"a"})), default_filters(30.0),
                                 default_scores())
    assert placement is None and "a: cordoned" in status.message


@pytest.mark.parametrize(("cached", "score"), [(("t/d/f@1",), 100), (("t/d/f@2",), 0), ((), 0)])
def test_snapshot_locality(cached: tuple[str, ...], score: int) -> None:
    n = node("a", 80, cached=cached)
    assert SnapshotLocality().score(CycleState(), req(), n, ClusterView((n,), ())) == score


@pytest.mark.parametrize(("mine", "score"), [(0, 100), (1, 50), (3, 25)])
def test_spread(mine: int, score: int) -> None:
    n = node("a", 80)
    view = ClusterView((n,), tuple(inst(f"i{k}", "a", 0, 1, fid="t/d/f") for k in range(mine)))
    assert Spread().score(CycleState(), req(), n, view) == score


def test_framework_prefers_cached_snapshot_then_spread() -> None:
    a, b = node("a", 80), node("b", 80, cached=("t/d/f@1",))
    status, placement = schedule(req(), ClusterView((a, b), ()), default_filters(30), default_scores())
    assert status.ok and placement is not None and placement.node.name == "b"
    view = ClusterView((a, node("b", 80)), (inst("i1", "b", 0, 1, fid="t/d/f"),))
    _, placement = schedule(req(), view, default_filters(30), default_scores())
    assert placement is not None and placement.node.name == "a"


def test_framework_no_fit_is_a_status_naming_each_node() -> None:
    a, b = node("a", 10), node("b", 80, heartbeat=1.0)
    status, placement = schedule(req(20), ClusterView((a, b), ()), default_filters(30), default_scores())
    assert placement is None and not status.ok
    assert "a: no GPU has" in status.message and "b: heartbeat" in status.message
    status, _ = schedule(req(), ClusterView((), ()), default_filters(30), default_scores())
    assert "no nodes registered" in status.message


IDLE = InstanceState.INSTANCE_STATE_IDLE


@pytest.mark.parametrize(("need", "rooms", "instances", "mins", "busy", "victims"), [
    # LRU: the longest idle goes first, and only as many as needed.
    (20, [GpuRoom("a", 0, 0)], [inst("new", "a", 0, 20, IDLE, "t/d/x", 50), inst("old", "a", 0, 20, IDLE, "t/d/y", 10)],
     {}, frozenset(), ("old",)),
    # Running instances are never victims.
    (20, [GpuRoom("a", 0, 0)], [inst("r", "a", 0, 40)], {}, frozenset(), None),
    # A claimed idle instance is not evicted.
    (20, [GpuRoom("a", 0, 0)], [inst("i", "a", 0, 40, IDLE, idle_since=1)], {}, frozenset({"i"}), None),
    # min_instances of the victim's function holds.
    (20, [GpuRoom("a", 0, 0)], [inst("i", "a", 0, 40, IDLE, "t/d/x", 1)], {"t/d/x": 1}, frozenset(), None),
    (20, [GpuRoom("a", 0, 0)], [inst("i", "a", 0, 40, IDLE, "t/d/x", 1), inst("j", "a", 0, 40, IDLE, "t/d/x", 2)],
     {"t/d/x": 1}, frozenset(), ("i",)),
    # Two small victims together make room.
    (30, [GpuRoom("a", 0, 0)], [inst("i", "a", 0, 15, IDLE, "t/d/x", 1), inst("j", "a", 0, 15, IDLE, "t/d/y", 2)],
     {}, frozenset(), ("i", "j")),
    # Fewest victims wins across GPUs: GPU 1 already has 10 free.
    (20, [GpuRoom("a", 0, 0), GpuRoom("a", 1, 10 * GiB)],
     [inst("i", "a", 0, 10, IDLE, "t/d/x", 1), inst("j", "a", 0, 10, IDLE, "t/d/y", 2),
      inst("k", "a", 1, 10, IDLE, "t/d/z", 5)], {}, frozenset(), ("k",)),
    # Victims must share one GPU.
    (20, [GpuRoom("a", 0, 0), GpuRoom("a", 1, 0)],
     [inst("i", "a", 0, 10, IDLE, "t/d/x", 1), inst("k", "a", 1, 10, IDLE, "t/d/z", 5)], {}, frozenset(), None),
])
def test_eviction(need: int, rooms: list[GpuRoom], instances: list[Instance], mins: dict[str, int],
                  busy: frozenset[str], victims: tuple[str, ...] | None) -> None:
    plan = plan_eviction(need * GiB, rooms, instances, mins, busy)
    if victims is None:
        assert plan is None
    else:
        assert plan is not None and tuple(v.id for v in plan.victims) == victims
