"""GPU inventory through NVML (nvidia-ml-py). A host without a GPU has an empty inventory."""

from __future__ import annotations

import logging
import os

from snapwake.v1 import types_pb2

__all__ = ["device_minors", "discover", "host_memory_bytes"]

log = logging.getLogger(__name__)


def discover() -> list[types_pb2.Gpu]:
    """Every GPU NVML sees, or ``[]`` when there is no driver or no device (never faked)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver: this is a CPU node
        log.info("no NVIDIA GPU: %s", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(types_pb2.Gpu(
                index=index, name=name.decode() if isinstance(name, bytes) else name,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def device_minors() -> dict[int, tuple[int, str]]:
    """GPU index -> (minor number of its /dev/nvidiaN, UUID), from NVML; ``{}`` without a GPU.
    The minor is not the index in general (the toolkit asks NVML the same way)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: a CPU node
        return {}
    try:
        out = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            out[index] = (int(pynvml.nvmlDeviceGetMinorNumber(handle)),
                          uuid.decode() if isinstance(uuid, bytes) else uuid)
        return out
    finally:
        pynvml.nvmlShutdown()


def host_memory_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
