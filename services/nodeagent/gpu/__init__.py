"""GPU inventory (NVML) and the driver-level process checkpoint. Imports work on CPU hosts."""

from services.nodeagent.gpu import devices
from services.nodeagent.gpu.checkpoint import Checkpointer, CudaCheckpointer, NoGpuCheckpointer
from services.nodeagent.gpu.devices import GpuAccess, NodeGpus
from services.nodeagent.gpu.inventory import device_minors, discover, host_memory_bytes

__all__ = ["Checkpointer", "CudaCheckpointer", "GpuAccess", "NoGpuCheckpointer", "NodeGpus", "device_minors", "devices",
           "discover",
           "host_memory_bytes"]
