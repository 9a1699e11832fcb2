"""Score: prefer nodes whose blobstore holds the snapshot in its pinned host-memory cache,
since a restore from there runs at PCIe speed instead of disk or network speed."""

from __future__ import annotations

from services.scheduler.policy.framework import ClusterView, CycleState, Request
from snapwake.v1.types_pb2 import Node

__all__ = ["SnapshotLocality"]


class SnapshotLocality:
    name = "SnapshotLocality"
    weight = 2

    def score(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> int:
        return 100 if req.snapshot_id and req.snapshot_id in node.cached_snapshots else 0
