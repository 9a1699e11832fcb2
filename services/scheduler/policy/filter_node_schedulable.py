"""Filter: the node is not cordoned. An operator's cordon (``snapwake node cordon`` or
``drain``) keeps every new instance, restore and standby off the node; what runs there stays
until it ends (or, under a drain, until it serves no request)."""

from __future__ import annotations

from services.scheduler.policy.framework import ClusterView, CycleState, Request, Status
from snapwake.v1.types_pb2 import Node

__all__ = ["NodeSchedulable"]


class NodeSchedulable:
    name = "NodeSchedulable"

    def filter(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> Status:
        if node.name in view.cordoned:
            return Status.unschedulable("cordoned")
        return Status()
