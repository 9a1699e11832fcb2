"""The scheduling framework: run every Filter on every node, then Score the survivors.

Per-attempt state lives in a fresh ``CycleState`` passed to each plugin, never on plugin
instances, so plugins are stateless and attempts cannot leak into each other. "No node fits"
is an expected outcome returned as a ``Status``; exceptions are only for bugs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from snapwake.v1.types_pb2 import Instance, Node

__all__ = ["ClusterView", "Code", "CycleState", "FilterPlugin", "Placement", "Request", "ScorePlugin",
           "Status", "schedule"]


class Code(enum.Enum):
    # The node (or the cycle) fits; go on.
    SUCCESS = "success"
    # No node can take it now; the caller evicts idle instances or waits for capacity.
    UNSCHEDULABLE = "unschedulable"


@dataclass(frozen=True)
class Status:
    """The outcome of a filter or of a whole cycle; ``message`` says why it did not fit."""

    code: Code = Code.SUCCESS
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.SUCCESS

    @classmethod
    def unschedulable(cls, message: str) -> Status:
        return cls(Code.UNSCHEDULABLE, message)


@dataclass(frozen=True)
class Request:
    """What one instance of a function needs."""

    function_id: str
    revision: int
    gpu_count: int
    gpu_memory_bytes: int
    snapshot_id: str = ""
    # Wall clock (unix seconds) of this attempt; plugins never read the clock themselves.
    now: float = 0.0
    # When set, only these (node, GPU index) pairs may take it: a standby restores onto the GPU
    # its driver checkpoint was taken on (the sandbox grants a container one GPU's device node).
    gpus: frozenset[tuple[str, int]] | None = None

    def allows(self, node: str, gpu_index: int) -> bool:
        return self.gpus is None or (node, gpu_index) in self.gpus


@dataclass(frozen=True)
class ClusterView:
    """The nodes and the instances (including starts in flight) one attempt looks at."""

    nodes: tuple[Node, ...]
    instances: tuple[Instance, ...]
    # Nodes an operator cordoned: no new instance goes there.
    cordoned: frozenset[str] = frozenset()

    def on_node(self, node: str) -> list[Instance]:
        return [i for i in self.instances if i.node == node]


@dataclass
class CycleState:
    """Scratch space for one scheduling attempt; e.g. the GPU a filter picked per node."""

    gpu_by_node: dict[str, int] = field(default_factory=dict)
    free_by_node: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    node: Node
    # -1 when the function needs no GPU.
    gpu_index: int


class FilterPlugin(Protocol):
    name: str

    def filter(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> Status: ...


class ScorePlugin(Protocol):
    name: str
    weight: int

    def score(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> int:
        """0..100; higher is better."""
        ...


def schedule(req: Request, view: ClusterView, filters: list[FilterPlugin], scores: list[ScorePlugin]
             ) -> tuple[Status, Placement | None]:
    """Picks the best node for ``req``; on failure the status lists why each node was rejected."""
    state = CycleState()
    feasible: list[Node] = []
    reasons: list[str] = []
    for node in view.nodes:
        status = _run_filters(state, req, node, view, filters)
        if status.ok:
            feasible.append(node)
        else:
            reasons.append(f"{node.name}: {status.message}")
    if not feasible:
        why = "; ".join(reasons) if reasons else "no nodes registered"
        return Status.unschedulable(f"no node fits: {why}"), None
    best = max(feasible, key=lambda n: (sum(p.weight * p.score(state, req, n, view) for p in scores),
                                        state.free_by_node.get(n.name, 0), n.name))
    return Status(), Placement(best, state.gpu_by_node.get(best.name, -1))


def _run_filters(state: CycleState, req: Request, node: Node, view: ClusterView,
                 filters: list[FilterPlugin]) -> Status:
    for plugin in filters:
        status = plugin.filter(state, req, node, view)
        if not status.ok:
            return status
    return Status()
