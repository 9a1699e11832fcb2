"""Filter: one GPU of the node has room for the function's memory slice.

Used memory on a GPU is the sum of the slices of the instances that hold GPU memory there or
are about to (``snapwake.lifecycle.CLAIMS_GPU``: standbys hold none), or what the node reports
as reserved, whichever is larger. Among the
GPUs that fit, the tightest fit wins so large holes stay free for large slices.
"""

from __future__ import annotations

from services.scheduler.policy.framework import ClusterView, CycleState, Request, Status
from snapwake.lifecycle import CLAIMS_GPU
from snapwake.v1.types_pb2 import Instance, Node

__all__ = ["GpuSlice", "gpu_free_bytes"]


def gpu_free_bytes(node: Node, instances: list[Instance]) -> dict[int, int]:
    """Free bytes per GPU index of ``node`` given the instances on it."""
    free: dict[int, int] = {}
    for gpu in node.gpus:
        used = sum(i.gpu_memory_bytes for i in instances
                   if i.gpu_index == gpu.index and i.state in CLAIMS_GPU)
        free[gpu.index] = gpu.memory_total_bytes - max(used, gpu.memory_reserved_bytes)
    return free


class GpuSlice:
    name = "GpuSlice"

    def filter(self, state: CycleState, req: Request, node: Node, view: ClusterView) -> Status:
        if req.gpu_count == 0:
            state.gpu_by_node[node.name] = -1
            return Status()
        if not node.gpus:
            return Status.unschedulable("no GPUs")
        free = {idx: f for idx, f in gpu_free_bytes(node, view.on_node(node.name)).items()
                if req.allows(node.name, idx)}
        if not free:
            return Status.unschedulable("none of its GPUs is one the request may use")
        fits = {idx: f for idx, f in free.items() if f >= req.gpu_memory_bytes}
        if not fits:
            most = max(free.values())
            return Status.unschedulable(
                f"no GPU has {req.gpu_memory_bytes} bytes free (most free: {most})")
        idx = min(fits, key=lambda i: (fits[i], i))
        state.gpu_by_node[node.name] = idx
        state.free_by_node[node.name] = fits[idx] - req.gpu_memory_bytes
        return Status()
