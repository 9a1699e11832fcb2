"""Score: spread a function's instances over nodes, so one node's loss costs the fewest."""

from __future__ import annotations

from services.scheduler.policy.framework import ClusterView, CycleState, Request
from snapwake.v1.types_pb2 import Node

__all__ = ["Spread"]


class Spread:
    name = "Spread"
    weight = 1

    def score(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> int:
        mine = sum(1 for i in view.on_node(node.name) if i.function_id == req.function_id)
        return 100 // (1 + mine)
