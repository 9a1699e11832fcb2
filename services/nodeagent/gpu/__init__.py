"""GPU inventory (NVML) and the driver-level process checkpoint. Imports work on CPU hosts."""

from services.nodeagent.gpu.checkpoint import Checkpointer, CudaCheckpointer, NoGpuCheckpointer
from services.nodeagent.gpu.inventory import discover, host_memory_bytes

__all__ = ["Checkpointer", "CudaCheckpointer", "NoGpuCheckpointer", "discover", "host_memory_bytes"]
