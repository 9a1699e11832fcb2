"""Placement as a pipeline of tiny plugins: Filter ("can this node take it?") then Score.

``default_filters``/``default_scores`` are the plugin set the scheduler runs; ``schedule`` in
``framework`` runs them with a fresh ``CycleState`` per attempt.
"""

from services.scheduler.policy.filter_gpu_slice import GpuSlice
from services.scheduler.policy.filter_node_ready import NodeReady
from services.scheduler.policy.filter_node_schedulable import NodeSchedulable
from services.scheduler.policy.framework import (
    ClusterView,
    Code,
    CycleState,
    FilterPlugin,
    Placement,
    Request,
    ScorePlugin,
    Status,
    schedule,
)
from services.scheduler.policy.score_snapshot_locality import SnapshotLocality
from services.scheduler.policy.score_spread import Spread

__all__ = ["ClusterView", "Code", "CycleState", "FilterPlugin", "GpuSlice", "NodeReady", "NodeSchedulable",
           "Placement", "Request", "ScorePlugin", "SnapshotLocality", "Spread", "Status", "default_filters",
           "default_scores", "schedule"]


def default_filters(stale_after_s: float) -> list[FilterPlugin]:
    return [NodeSchedulable(), NodeReady(stale_after_s), GpuSlice()]


def default_scores() -> list[ScorePlugin]:
    return [SnapshotLocality(), Spread()]
