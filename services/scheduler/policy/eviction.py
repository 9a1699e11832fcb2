"""Eviction (pure): which IDLE instances to stop so a start fits on some GPU.

Least recently used first (an IDLE instance's ``update_time`` is when it went idle), never
an instance with a claim out, and never below ``min_instances`` of the victim's function.
Among GPUs that can be freed enough, the plan with the fewest victims wins, then the one
whose victims have been idle longest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from snapwake.lifecycle import SERVING
from snapwake.v1.types_pb2 import Instance, InstanceState

__all__ = ["EvictionPlan", "GpuRoom", "plan_eviction"]


@dataclass(frozen=True)
class GpuRoom:
    node: str
    gpu_index: int
    free_bytes: int


@dataclass(frozen=True)
class EvictionPlan:
    node: str
    gpu_index: int
    victims: tuple[Instance, ...]


def _idle_since(inst: Instance) -> float:
    return inst.update_time.ToNanoseconds() / 1e9


def _plan_for(room: GpuRoom, need: int, candidates: list[Instance], budget: Counter[str]) -> EvictionPlan | None:
    free, chosen, left = room.free_bytes, [], Counter(budget)
    for inst in candidates:
        if free >= need:
            break
        if left[inst.function_id] <= 0:
            continue
        left[inst.function_id] -= 1
        chosen.append(inst)
        free += inst.gpu_memory_bytes
    return EvictionPlan(room.node, room.gpu_index, tuple(chosen)) if free >= need and chosen else None


def plan_eviction(need_bytes: int, rooms: list[GpuRoom], instances: list[Instance],
                  min_instances: Mapping[str, int], busy: frozenset[str] = frozenset()) -> EvictionPlan | None:
    """A plan that frees ``need_bytes`` on one GPU, or None if no plan exists."""
    serving = Counter(i.function_id for i in instances if i.state in SERVING)
    budget = Counter({fid: n - min_instances.get(fid, 0) for fid, n in serving.items()})
    idle = sorted((i for i in instances if i.state == InstanceState.INSTANCE_STATE_IDLE and i.id not in busy),
                  key=lambda i: (_idle_since(i), i.id))
    plans = []
    for room in rooms:
        on_gpu = [i for i in idle if i.node == room.node and i.gpu_index == room.gpu_index]
        plan = _plan_for(room, need_bytes, on_gpu, budget)
        if plan is not None:
            plans.append(plan)
    if not plans:
        return None
    return min(plans, key=lambda p: (len(p.victims), max(_idle_since(v) for v in p.victims), p.node))
