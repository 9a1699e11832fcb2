"""Driver-level checkpoint of a container's CUDA state, by the host pid of its process.

``CudaCheckpointer`` calls ``cuCheckpointProcessLock/Checkpoint`` to move what is left of a
released standby's GPU state (context, kernels: about 0.8 GB) into its host memory, and
``cuCheckpointProcessRestore/Unlock`` to bring it back (about 0.3 s on an H100).
``NoGpuCheckpointer`` is for hosts without a GPU: a CPU model server holds no device state, so
there is nothing to checkpoint and the standby is simply the released process.
The CUDA calls block, so they run in a worker thread; a failed one raises ``CudaError`` naming
the call and the pid (``snapwake.cuda``).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from typing import Any

from snapwake import cuda

__all__ = ["Checkpointer", "CudaCheckpointer", "NoGpuCheckpointer"]

log = logging.getLogger(__name__)


class Checkpointer(abc.ABC):
    """Suspends and resumes the GPU state of another process."""

    @abc.abstractmethod
    async def checkpoint(self, pid: int) -> float:
        """Locks the process's CUDA calls and checkpoints its device state; returns seconds."""

    @abc.abstractmethod
    async def restore(self, pid: int) -> float:
        """Restores the device state and unlocks the process; returns seconds."""


class NoGpuCheckpointer(Checkpointer):
    """A CPU host: the process has no device state, so both steps are no-ops."""

    async def checkpoint(self, pid: int) -> float:
        return 0.0

    async def restore(self, pid: int) -> float:
        return 0.0


class CudaCheckpointer(Checkpointer):
    """The CUDA driver's process checkpoint API (driver 550+, cuda-python ``cuda.bindings``)."""

    def __init__(self, lock_timeout_ms: int = 10_000, cu: Any = None) -> None:
        """``cu`` is the driver module; by default ``cuda.bindings.driver``, imported here so CPU
        hosts never need it."""
        self._cu: Any = cu if cu is not None else cuda.driver()
        self.lock_timeout_ms = lock_timeout_ms
        self._call("cuInit", 0)

    def _call(self, name: str, *args: Any) -> Any:
        return cuda.check(getattr(self._cu, name)(*args), f"{name}({args[0] if args else ''})")

    def _checkpoint(self, pid: int) -> float:
        start = time.perf_counter()
        lock = self._cu.CUcheckpointLockArgs()
        lock.timeoutMs = self.lock_timeout_ms
        self._call("cuCheckpointProcessLock", pid, lock)
        try:
            self._call("cuCheckpointProcessCheckpoint", pid, self._cu.CUcheckpointCheckpointArgs())
        except cuda.CudaError:
            self._call("cuCheckpointProcessUnlock", pid, self._cu.CUcheckpointUnlockArgs())
            raise
        return time.perf_counter() - start

    def _restore(self, pid: int) -> float:
        start = time.perf_counter()
        self._call("cuCheckpointProcessRestore", pid, self._cu.CUcheckpointRestoreArgs())
        self._call("cuCheckpointProcessUnlock", pid, self._cu.CUcheckpointUnlockArgs())
        return time.perf_counter() - start

    async def checkpoint(self, pid: int) -> float:
        seconds = await asyncio.to_thread(self._checkpoint, pid)
        log.info("checkpointed pid %d in %.3fs", pid, seconds)
        return seconds

    async def restore(self, pid: int) -> float:
        seconds = await asyncio.to_thread(self._restore, pid)
        log.info("restored pid %d in %.3fs", pid, seconds)
        return seconds
