"""Arena backends: one region of memory that holds every weight, behind one interface.

    Arena (base.py)     the interface
    MemfdArena          host memory in a memfd (CPU; also what CI tests run)
    CudaArena           device memory through the CUDA VMM API (cuMemCreate / import an fd)
"""

from modelserver.arena.base import Arena
from modelserver.arena.memfd import MemfdArena

__all__ = ["Arena", "MemfdArena", "make_arena"]


def make_arena(device: str, gpu_index: int = 0, reserve_bytes: int = 0, cuda_device: int = -1,
               trim: bool = True) -> Arena:
    """The backend for ``device`` ("cpu" or "cuda"); the CUDA one is imported only when asked.
    ``trim``: the CUDA arena's release also shrinks the context for the standby checkpoint."""
    if device == "cuda":
        from modelserver.arena.cuda import CudaArena
        return CudaArena(gpu_index, reserve_bytes, cuda_device, trim)
    return MemfdArena()
