"""Admission of driver work on one node: bounded restores, bounded checkpoints.

A driver restore (plus its blobstore DMA) is on some request's cold-start path; a driver
checkpoint (parking an idle instance, or finishing a new standby) is not, yet both move GPU
state over the same PCIe link and host memory. Run side by side, parking checkpoints and a
burst of restores slow each other down: in the 30-model density run restore p50 was 0.64 s
but p90 1.7 s. So on a node:

- at most ``max_restores`` restores run at once; more wait in FIFO order. A restore never
  waits for a checkpoint: one already running goes on beside it.
- at most ``max_checkpoints`` checkpoints run at once; more wait in FIFO order. Checkpoints
  do not wait for restores. A first version held every checkpoint back while any restore
  ran or waited; on the H100 density run that starved parking (1051 park attempts, 133
  checkpoints done), so idle instances kept their GPU slices and the restores that needed
  that room queued in the scheduler for seconds. Parking *is* on the cold-start path when
  the GPU is full.

Every wait is bounded by the caller's ``limit_s``; a wait that runs out raises
``DeadlineExceeded`` naming what it waited for.
The gate is two FIFO ``asyncio.Semaphore``s with counters for the messages, one per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from snapwake import errors

__all__ = ["DriverGate"]


class _Slots:
    """``limit`` slots of one kind of driver work, handed out in arrival order."""

    def __init__(self, kind: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_{kind}s: must be at least 1, got {limit}")
        self.kind, self.running, self.waiting = kind, 0, 0
        self._sem = asyncio.Semaphore(limit)

    @contextlib.asynccontextmanager
    async def hold(self, limit_s: float, busy: Callable[[], str]) -> AsyncIterator[float]:
        started = time.monotonic()
        self.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, limit_s)):
                await self._sem.acquire()
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"{self.kind} waited {limit_s:.1f}s for a driver slot on this node ({busy()})") from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield time.monotonic() - started
        finally:
            self.running -= 1
            self._sem.release()


class DriverGate:
    """Bounds driver restores and checkpoints on one node (see module docstring)."""

    def __init__(self, max_restores: int = 4, max_checkpoints: int = 2) -> None:
        self._restores, self._checkpoints = _Slots("restore", max_restores), _Slots("checkpoint", max_checkpoints)

    @property
    def restoring(self) -> int:
        return self._restores.running

    @property
    def checkpointing(self) -> int:
        return self._checkpoints.running

    @property
    def restores_waiting(self) -> int:
        return self._restores.waiting

    @property
    def checkpoints_waiting(self) -> int:
        return self._checkpoints.waiting

    def restore(self, limit_s: float) -> contextlib.AbstractAsyncContextManager[float]:
        """Holds a restore slot for the block; yields the seconds it waited for one."""
        return self._restores.hold(limit_s, self._busy)

    def checkpoint(self, limit_s: float) -> contextlib.AbstractAsyncContextManager[float]:
        """Holds a checkpoint slot for the block; yields the seconds it waited for one."""
        return self._checkpoints.hold(limit_s, self._busy)

    def _busy(self) -> str:
        return (f"{self.restoring} restores running, {self.restores_waiting} waiting; "
                f"{self.checkpointing} checkpoints running, {self.checkpoints_waiting} waiting")
