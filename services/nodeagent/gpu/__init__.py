"""GPU inventory and per-process memory (NVML) and the driver-level process checkpoint. Imports
work on CPU hosts."""

from services.nodeagent.gpu import devices, memory
from services.nodeagent.gpu.checkpoint import Checkpointer, CudaCheckpointer, NoGpuCheckpointer
from services.nodeagent.gpu.devices import GpuAccess, NodeGpus
from services.nodeagent.gpu.inventory import device_minors, discover, host_memory_bytes
from services.nodeagent.gpu.memory import (
    FakeProcessMemory,
    NvmlProcessMemory,
    ProcessMemory,
    ProcessMemoryReader,
    SliceLimit,
)

__all__ = ["Checkpointer", "CudaCheckpointer", "FakeProcessMemory", "GpuAccess", "NoGpuCheckpointer", "NodeGpus",
           "NvmlProcessMemory", "ProcessMemory", "ProcessMemoryReader", "SliceLimit", "device_minors", "devices",
           "discover", "host_memory_bytes", "memory"]
