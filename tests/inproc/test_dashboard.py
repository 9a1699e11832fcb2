"""``build_state``, the dashboard's pure core: grouping, GPU slices, tiers, cold starts, tenants.

The endpoint, the gateway mount, the key cookie and the page itself are tested over real gRPC
and a real browser in ``test_dashboard_live.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.dashboard import build_state
from services.gateway.dashboard.state import COLD_STARTS_SHOWN, OTHER_TENANT
from snapwake.v1 import types_pb2

GiB = 1 << 30
LLAMA, TINY, RIVAL = "acme/default/llama", "acme/default/tiny", "other/default/llama"


def _inst(iid: str, fn: str, state: int, gpu: int = 0, start: float = 0.0, at: int = 0) -> types_pb2.Instance:
    return types_pb2.Instance(id=iid, function_id=fn, node="n1", gpu_index=gpu, gpu_memory_bytes=20 * GiB, state=state,
                      last_start_seconds=start, update_time=Timestamp(seconds=at))


FUNCTIONS = [types_pb2.Function(id=LLAMA, revision=2, state=types_pb2.FUNCTION_STATE_READY,
                        spec=types_pb2.FunctionSpec(resources=types_pb2.Resources(gpu_memory_bytes=20 * GiB))),
             types_pb2.Function(id=TINY, revision=1, state=types_pb2.FUNCTION_STATE_PENDING),
             types_pb2.Function(id=RIVAL, revision=1, state=types_pb2.FUNCTION_STATE_READY)]
INSTANCES = [_inst("i-00000000000a", LLAMA, types_pb2.INSTANCE_STATE_RUNNING, start=0.41, at=1000),
             _inst("i-00000000000b", LLAMA, types_pb2.INSTANCE_STATE_STANDBY),
             _inst("i-00000000000c", LLAMA, types_pb2.INSTANCE_STATE_IDLE, gpu=1, start=0.38, at=2000),
             _inst("i-00000000000d", RIVAL, types_pb2.INSTANCE_STATE_RESTORING, gpu=1, start=0.5, at=2500)]
NODES = [types_pb2.Node(name="n1", address="10.0.0.1:7001", heartbeat_time=Timestamp(seconds=2990),
                cached_snapshots=[LLAMA + "@2", RIVAL + "@1"],
                gpus=[types_pb2.Gpu(index=0, name="H100", memory_total_bytes=80 * GiB),
                      types_pb2.Gpu(index=1, name="H100", memory_total_bytes=80 * GiB)]),
         types_pb2.Node(name="n0", address="10.0.0.0:7001")]
SNAPSHOTS = [types_pb2.Snapshot(id=LLAMA + "@2", function_id=LLAMA, revision=2, state=types_pb2.SNAPSHOT_STATE_READY,
                        disk_nodes=["n1", "n2"], cache_nodes=["n1"]),
             types_pb2.Snapshot(id=TINY + "@1", function_id=TINY, revision=1, state=types_pb2.SNAPSHOT_STATE_BUILDING,
                        bytes_written=5, total_bytes=10),
             types_pb2.Snapshot(id=RIVAL + "@1", function_id=RIVAL, revision=1, state=types_pb2.SNAPSHOT_STATE_READY,
                        disk_nodes=["n1"])]


def _state(tenant: str | None) -> dict[str, Any]:
    return build_state(FUNCTIONS, INSTANCES, NODES, SNAPSHOTS, now=3000.0, tenant=tenant)


def test_functions_group_their_instances_by_state() -> None:
    llama, tiny, rival = _state(None)["functions"]
    assert (llama["id"], llama["instances_by_state"]) == (LLAMA, {"RUNNING": 1, "STANDBY": 1, "IDLE": 1})
    assert (tiny["state"], tiny["instances_by_state"], tiny["instances"]) == ("PENDING", {}, [])
    assert llama["gpu_memory_bytes"] == 20 * GiB and rival["instances_by_state"] == {"RESTORING": 1}


def test_nodes_sorted_with_heartbeat_age_and_only_gpu_holding_slices() -> None:
    n0, n1 = _state(None)["nodes"]
    assert (n0["name"], n0["heartbeat_age_seconds"], n0["gpus"]) == ("n0", None, [])
    assert n1["heartbeat_age_seconds"] == 10.0
    gpu0, gpu1 = n1["gpus"]
    assert [s["instance_id"] for s in gpu0["slices"]] == ["i-00000000000a"]  # the standby holds no GPU
    assert [(s["state"], s["function_id"]) for s in gpu1["slices"]] == [("IDLE", LLAMA), ("RESTORING", RIVAL)]


@pytest.mark.parametrize(("tenant", "tiers"), [
    (None, [(LLAMA + "@2", "cache"), (TINY + "@1", "none"), (RIVAL + "@1", "cache")]),  # sorted by id
    ("acme", [(LLAMA + "@2", "cache"), (TINY + "@1", "none")]),
    ("other", [(RIVAL + "@1", "cache")]),
    ("nobody", []),
])
def test_snapshot_tiers_per_tenant(tenant: str | None, tiers: list[tuple[str, str]]) -> None:
    assert [(s["id"], s["tier"]) for s in _state(tenant)["snapshots"]] == tiers


@pytest.mark.parametrize(("record_cache", "node_cache", "disk", "tier", "cache_nodes"), [
    ([], [], [], "none", []),
    ([], [], ["n1"], "disk", []),
    (["n2"], [], ["n1"], "cache", ["n2"]),
    ([], ["n1"], ["n1"], "cache", ["n1"]),  # only the node record knows it is cached
    (["n2"], ["n1", "n2"], [], "cache", ["n1", "n2"]),
])
def test_cache_tier_merges_snapshot_and_node_records(record_cache: list[str], node_cache: list[str],
                                                    disk: list[str], tier: str, cache_nodes: list[str]) -> None:
    snap = types_pb2.Snapshot(id=LLAMA + "@2", function_id=LLAMA, cache_nodes=record_cache, disk_nodes=disk)
    nodes = [types_pb2.Node(name=n, cached_snapshots=[snap.id] if n in node_cache else [TINY + "@1"]) for n in ("n1", "n2")]
    (got,) = build_state([], [], nodes, [snap], now=0.0)["snapshots"]
    assert (got["tier"], got["cache_nodes"], got["disk_nodes"]) == (tier, cache_nodes, disk)


@pytest.mark.parametrize(("tenant", "functions", "cold", "cached", "gpu1"), [
    (None, [LLAMA, TINY, RIVAL], ["i-00000000000d", "i-00000000000c", "i-00000000000a"],
     [LLAMA + "@2", RIVAL + "@1"], [LLAMA, RIVAL]),
    ("acme", [LLAMA, TINY], ["i-00000000000c", "i-00000000000a"], [LLAMA + "@2"], [LLAMA, OTHER_TENANT]),
    ("other", [RIVAL], ["i-00000000000d"], [RIVAL + "@1"], [OTHER_TENANT, RIVAL]),
    # "acm" is a prefix of "acme" but not its tenant
    ("acm", [], [], [], [OTHER_TENANT, OTHER_TENANT]),
])
def test_tenant_sees_its_own_and_only_the_size_of_others(tenant: str | None, functions: list[str],
                                                         cold: list[str], cached: list[str],
                                                         gpu1: list[str]) -> None:
    st = _state(tenant)
    assert st["tenant"] == tenant
    assert [f["id"] for f in st["functions"]] == functions
    assert [c["instance_id"] for c in st["cold_starts"]] == cold  # newest first
    n1 = st["nodes"][1]
    assert n1["cached_snapshots"] == cached
    slices = n1["gpus"][1]["slices"]
    assert [s["function_id"] for s in slices] == gpu1 and [s["bytes"] for s in slices] == [20 * GiB] * 2
    assert all(s["instance_id"] == "" and s["state"] == "" for s in slices if s["function_id"] == OTHER_TENANT)


def test_cold_starts_are_capped() -> None:
    many = [_inst(f"i-{n:012x}", LLAMA, types_pb2.INSTANCE_STATE_IDLE, start=0.1, at=n) for n in range(30)]
    cold = build_state(FUNCTIONS, many, [], [], now=100.0)["cold_starts"]
    assert len(cold) == COLD_STARTS_SHOWN and cold[0]["at"] == 29.0
    assert cold[0] == {"instance_id": "i-00000000001d", "function_id": LLAMA, "node": "n1", "seconds": 0.1,
                       "at": 29.0}
