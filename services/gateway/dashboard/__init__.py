"""The web dashboard: one HTML page polling ``api/state`` every second.

The gateway mounts ``build_app(client)`` at ``/dashboard``. The state is built from the
scheduler's admin lists by the pure ``build_state``; when the scheduler cannot be reached the
endpoint answers 503 with ``{"ok": false, "error": ...}`` and the page shows a banner until a
later poll succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from services.gateway.dashboard._page import PAGE
from snapwake import errors
from snapwake.v1 import types_pb2 as t

__all__ = ["SchedulerClient", "build_app", "build_state"]

log = logging.getLogger(__name__)
# States in which an instance's slice is actually allocated on its GPU (standby holds none).
_HOLDS_GPU = {t.INSTANCE_STATE_SNAPSHOTTING, t.INSTANCE_STATE_STARTING, t.INSTANCE_STATE_RESTORING,
              t.INSTANCE_STATE_RUNNING, t.INSTANCE_STATE_IDLE}
COLD_STARTS_SHOWN = 20


class SchedulerClient(Protocol):
    """What the dashboard needs from the gateway's scheduler client; each returns proto messages
    and raises a ``snapwake.errors.SnapwakeError`` (or ``grpc.RpcError``) when it cannot."""

    async def list_functions(self) -> Sequence[t.Function]: ...
    async def list_instances(self) -> Sequence[t.Instance]: ...
    async def list_nodes(self) -> Sequence[t.Node]: ...
    async def list_snapshots(self) -> Sequence[t.Snapshot]: ...


def _name(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _ts(msg: Message) -> float:
    return msg.seconds + msg.nanos / 1e9  # type: ignore[attr-defined]


def _instance(i: t.Instance) -> dict[str, Any]:
    return {"id": i.id, "state": _name(i.state, t.InstanceState, "INSTANCE_STATE_"), "node": i.node,
            "gpu": i.gpu_index, "gpu_memory_bytes": i.gpu_memory_bytes, "endpoint": i.endpoint,
            "message": i.message, "last_start_seconds": i.last_start_seconds}


def _gpu(node: t.Node, g: t.Gpu, instances: Sequence[t.Instance]) -> dict[str, Any]:
    slices = [{"instance_id": i.id, "function_id": i.function_id, "bytes": i.gpu_memory_bytes,
               "state": _name(i.state, t.InstanceState, "INSTANCE_STATE_")}
              for i in instances if i.node == node.name and i.gpu_index == g.index and i.state in _HOLDS_GPU]
    return {"index": g.index, "name": g.name, "memory_total_bytes": g.memory_total_bytes,
            "memory_reserved_bytes": g.memory_reserved_bytes, "slices": slices}


def _snapshot(s: t.Snapshot) -> dict[str, Any]:
    tier = "cache" if s.cache_nodes else "disk" if s.disk_nodes else "none"
    return {"id": s.id, "function_id": s.function_id, "revision": s.revision,
            "state": _name(s.state, t.SnapshotState, "SNAPSHOT_STATE_"), "bytes_written": s.bytes_written,
            "total_bytes": s.total_bytes, "disk_nodes": list(s.disk_nodes), "cache_nodes": list(s.cache_nodes),
            "tier": tier, "message": s.message}


def build_state(functions: Sequence[t.Function], instances: Sequence[t.Instance], nodes: Sequence[t.Node],
                snapshots: Sequence[t.Snapshot], now: float) -> dict[str, Any]:
    """The JSON the page renders, from the scheduler's lists."""
    fns = []
    for f in sorted(functions, key=lambda f: f.id):
        mine = [i for i in instances if i.function_id == f.id]
        by_state: dict[str, int] = {}
        for i in mine:
            key = _name(i.state, t.InstanceState, "INSTANCE_STATE_")
            by_state[key] = by_state.get(key, 0) + 1
        fns.append({"id": f.id, "revision": f.revision, "state": _name(f.state, t.FunctionState, "FUNCTION_STATE_"),
                    "message": f.status_message, "gpu_memory_bytes": f.spec.resources.gpu_memory_bytes,
                    "instances_by_state": by_state, "instances": [_instance(i) for i in mine]})
    cold = sorted((i for i in instances if i.last_start_seconds > 0), key=lambda i: -_ts(i.update_time))
    return {
        "ok": True, "time": now, "functions": fns,
        "nodes": [{"name": n.name, "address": n.address, "cached_snapshots": list(n.cached_snapshots),
                   "heartbeat_age_seconds": round(now - _ts(n.heartbeat_time), 1) if _ts(n.heartbeat_time) else None,
                   "gpus": [_gpu(n, g, instances) for g in n.gpus]} for n in sorted(nodes, key=lambda n: n.name)],
        "snapshots": [_snapshot(s) for s in sorted(snapshots, key=lambda s: s.id)],
        "cold_starts": [{"instance_id": i.id, "function_id": i.function_id, "node": i.node,
                         "seconds": i.last_start_seconds, "at": _ts(i.update_time)}
                        for i in cold[:COLD_STARTS_SHOWN]],
    }


def build_app(scheduler_client: SchedulerClient, timeout: float = 2.0) -> Starlette:
    """The dashboard app; ``timeout`` bounds one state refresh (the page polls every second)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def state(request: Request) -> Response:
        c = scheduler_client
        try:
            lists = await asyncio.wait_for(asyncio.gather(
                c.list_functions(), c.list_instances(), c.list_nodes(), c.list_snapshots()), timeout)
        except (errors.SnapwakeError, grpc.RpcError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, errors.SnapwakeError) else (
                f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError)
                else errors.from_rpc_error(exc).message)
            log.info("dashboard: scheduler unreachable: %s", reason)
            return JSONResponse({"ok": False, "error": f"scheduler unreachable: {reason}", "time": time.time()},
                                status_code=503, headers={"Cache-Control": "no-store"})
        return JSONResponse(build_state(*lists, now=time.time()), headers={"Cache-Control": "no-store"})

    return Starlette(routes=[Route("/", page), Route("/api/state", state)])
