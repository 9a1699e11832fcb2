"""``build_state``: the JSON the dashboard page renders, from the scheduler's admin lists.

Pure and synchronous, so it is tested with tables. With ``tenant`` set (API keys on) only that
tenant's functions, instances and snapshots are shown; other tenants' GPU slices keep their size
but lose their names, so a tenant sees how full a GPU is without learning who else runs there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from snapwake.lifecycle import HOLDS_GPU
from snapwake.v1 import types_pb2

__all__ = ["COLD_STARTS_SHOWN", "OTHER_TENANT", "build_state"]

COLD_STARTS_SHOWN = 20
OTHER_TENANT = "(other tenant)"


def _name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _state(i: types_pb2.Instance) -> str:
    return _name(i.state, types_pb2.InstanceState, "INSTANCE_STATE_")


def _ts(msg: Message) -> float:
    return msg.seconds + msg.nanos / 1e9  # type: ignore[attr-defined]


def _mine(function_id: str, tenant: str | None) -> bool:
    return tenant is None or function_id.startswith(tenant + "/")


def _instance(i: types_pb2.Instance) -> dict[str, Any]:
    return {"id": i.id, "state": _state(i), "node": i.node, "gpu": i.gpu_index,
            "gpu_memory_bytes": i.gpu_memory_bytes, "endpoint": i.endpoint, "message": i.message,
            "last_start_seconds": i.last_start_seconds}


def _slice(i: types_pb2.Instance, tenant: str | None) -> dict[str, Any]:
    if not _mine(i.function_id, tenant):
        return {"instance_id": "", "function_id": OTHER_TENANT, "bytes": i.gpu_memory_bytes, "state": ""}
    return {"instance_id": i.id, "function_id": i.function_id, "bytes": i.gpu_memory_bytes, "state": _state(i)}


def _gpu(node: types_pb2.Node, g: types_pb2.Gpu, instances: Sequence[types_pb2.Instance], tenant: str | None) -> dict[str, Any]:
    slices = [_slice(i, tenant) for i in instances
              if i.node == node.name and i.gpu_index == g.index and i.state in HOLDS_GPU]
    return {"index": g.index, "name": g.name, "memory_total_bytes": g.memory_total_bytes,
            "memory_reserved_bytes": g.memory_reserved_bytes, "slices": slices}


def _node(n: types_pb2.Node, instances: Sequence[types_pb2.Instance], tenant: str | None, now: float) -> dict[str, Any]:
    beat = _ts(n.heartbeat_time)
    return {"name": n.name, "address": n.address,
            "cached_snapshots": [s for s in n.cached_snapshots if _mine(s, tenant)],
            "heartbeat_age_seconds": round(now - beat, 1) if beat else None,
            "gpus": [_gpu(n, g, instances, tenant) for g in n.gpus]}


def _snapshot(s: types_pb2.Snapshot, nodes: Sequence[types_pb2.Node]) -> dict[str, Any]:
    # Nodes report their host-memory cache on their own record (polled from the blobstore), so
    # that is the fresher source; the snapshot record's list is merged in.
    cache = sorted({*s.cache_nodes, *(n.name for n in nodes if s.id in n.cached_snapshots)})
    tier = "cache" if cache else "disk" if s.disk_nodes else "none"
    return {"id": s.id, "function_id": s.function_id, "revision": s.revision,
            "state": _name(s.state, types_pb2.SnapshotState, "SNAPSHOT_STATE_"), "bytes_written": s.bytes_written,
            "total_bytes": s.total_bytes, "disk_nodes": list(s.disk_nodes), "cache_nodes": cache,
            "tier": tier, "message": s.message}


def _function(f: types_pb2.Function, instances: Sequence[types_pb2.Instance]) -> dict[str, Any]:
    mine = [i for i in instances if i.function_id == f.id]
    by_state: dict[str, int] = {}
    for i in mine:
        by_state[_state(i)] = by_state.get(_state(i), 0) + 1
    return {"id": f.id, "revision": f.revision, "state": _name(f.state, types_pb2.FunctionState, "FUNCTION_STATE_"),
            "message": f.status_message, "gpu_memory_bytes": f.spec.resources.gpu_memory_bytes,
            "instances_by_state": by_state, "instances": [_instance(i) for i in mine]}


def build_state(functions: Sequence[types_pb2.Function], instances: Sequence[types_pb2.Instance], nodes: Sequence[types_pb2.Node],
                snapshots: Sequence[types_pb2.Snapshot], now: float, tenant: str | None = None) -> dict[str, Any]:
    """The JSON the page renders; ``tenant`` limits it to one tenant (None: everything)."""
    own = [i for i in instances if _mine(i.function_id, tenant)]
    cold = sorted((i for i in own if i.last_start_seconds > 0), key=lambda i: -_ts(i.update_time))
    return {
        "ok": True, "time": now, "tenant": tenant,
        "functions": [_function(f, own) for f in sorted(functions, key=lambda f: f.id) if _mine(f.id, tenant)],
        "nodes": [_node(n, instances, tenant, now) for n in sorted(nodes, key=lambda n: n.name)],
        "snapshots": [_snapshot(s, nodes) for s in sorted(snapshots, key=lambda s: s.id)
                      if _mine(s.function_id, tenant)],
        "cold_starts": [{"instance_id": i.id, "function_id": i.function_id, "node": i.node,
                         "seconds": i.last_start_seconds, "at": _ts(i.update_time)}
                        for i in cold[:COLD_STARTS_SHOWN]],
    }
