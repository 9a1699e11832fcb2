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
The gate is pure asyncio (no I/O, no clock but for the reported wait), one per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from snapwake import errors

__all__ = ["DriverGate"]

_RESTORE, _CHECKPOINT = "restore", "checkpoint"


class DriverGate:
    """Orders driver restores and checkpoints on one node (see module docstring)."""

    def __init__(self, max_restores: int = 4, max_checkpoints: int = 2) -> None:
        if max_restores < 1:
            raise ValueError(f"max_restores: must be at least 1, got {max_restores}")
        if max_checkpoints < 1:
            raise ValueError(f"max_checkpoints: must be at least 1, got {max_checkpoints}")
        self.max_restores, self.max_checkpoints = max_restores, max_checkpoints
        self.restoring = 0  # restores holding a slot
        self.checkpointing = 0  # checkpoints holding a slot
        self._restore_queue: deque[asyncio.Future[None]] = deque()
        self._checkpoint_queue: deque[asyncio.Future[None]] = deque()

    @property
    def restores_waiting(self) -> int:
        return len(self._restore_queue)

    @property
    def checkpoints_waiting(self) -> int:
        return len(self._checkpoint_queue)

    @contextlib.asynccontextmanager
    async def restore(self, limit_s: float) -> AsyncIterator[float]:
        """Holds a restore slot for the block; yields the seconds it waited for one."""
        started = time.monotonic()
        if self.restoring < self.max_restores and not self._restore_queue:
            self.restoring += 1
        else:
            await self._wait(_RESTORE, limit_s)
        try:
            yield time.monotonic() - started
        finally:
            self.restoring -= 1
            self._grant()

    @contextlib.asynccontextmanager
    async def checkpoint(self, limit_s: float) -> AsyncIterator[float]:
        """Holds a checkpoint slot for the block; yields the seconds it waited for one."""
        started = time.monotonic()
        if self._checkpoint_may_start() and not self._checkpoint_queue:
            self.checkpointing += 1
        else:
            await self._wait(_CHECKPOINT, limit_s)
        try:
            yield time.monotonic() - started
        finally:
            self.checkpointing -= 1
            self._grant()

    def _checkpoint_may_start(self) -> bool:
        return self.checkpointing < self.max_checkpoints

    def _busy(self) -> str:
        return (f"{self.restoring} restores running, {self.restores_waiting} waiting; "
                f"{self.checkpointing} checkpoints running, {self.checkpoints_waiting} waiting")

    async def _wait(self, kind: str, limit_s: float) -> None:
        """Queues a future that ``_grant`` resolves once it has counted a slot for it."""
        queue = self._restore_queue if kind == _RESTORE else self._checkpoint_queue
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(granted)
        try:
            async with asyncio.timeout(max(0.0, limit_s)):
                await granted
        except BaseException as exc:  # timed out or cancelled: give back what this waiter holds
            if granted.done() and not granted.cancelled():  # the slot came just before the end
                self._release(kind)
            elif granted in queue:
                queue.remove(granted)
            self._grant()  # a restore leaving the queue may let a checkpoint start
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"{kind} waited {limit_s:.1f}s for a driver slot on this node ({self._busy()})") from None
            raise

    def _release(self, kind: str) -> None:
        if kind == _RESTORE:
            self.restoring -= 1
        else:
            self.checkpointing -= 1

    def _grant(self) -> None:
        """Hands free slots to waiters of each kind, in FIFO order."""
        while self.restoring < self.max_restores and self._restore_queue:
            if _resolve(self._restore_queue.popleft()):
                self.restoring += 1
        while self._checkpoint_may_start() and self._checkpoint_queue:
            if _resolve(self._checkpoint_queue.popleft()):
                self.checkpointing += 1


def _resolve(waiter: asyncio.Future[None]) -> bool:
    """Wakes ``waiter``; False when it was cancelled meanwhile (its task cleans up after itself)."""
    if waiter.done():
        return False
    waiter.set_result(None)
    return True
