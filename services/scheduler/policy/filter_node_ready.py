"""Filter: the node has an address and a recent heartbeat (its etcd lease keeps the key alive,
but a stuck agent can still hold a lease, so the heartbeat is checked too)."""

from __future__ import annotations

from services.scheduler.policy.framework import ClusterView, CycleState, Request, Status
from snapwake.v1.types_pb2 import Node

__all__ = ["NodeReady"]


class NodeReady:
    name = "NodeReady"

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s

    def filter(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> Status:
        if not node.address:
            return Status.unschedulable("no nodeagent address")
        if node.HasField("heartbeat_time") and req.now:
            age = req.now - node.heartbeat_time.ToNanoseconds() / 1e9
            if age > self.stale_after_s:
                return Status.unschedulable(f"heartbeat {age:.0f}s old")
        return Status()
