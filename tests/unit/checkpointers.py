"""A checkpointer for the nodeagent's unit tests: no device state, every call recorded."""

from __future__ import annotations

from collections.abc import Sequence

from services.nodeagent.gpu import NoGpuCheckpointer

__all__ = ["RecordingCheckpointer"]


class RecordingCheckpointer(NoGpuCheckpointer):
    """No device state to move; records ("checkpoint" | "restore", pid), one per process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def checkpoint(self, pid: int) -> float:
        self.calls.append(("checkpoint", pid))
        return 0.0

    async def restore(self, pid: int) -> float:
        self.calls.append(("restore", pid))
        return 0.0

    async def checkpoint_all(self, pids: Sequence[int]) -> tuple[int, ...]:
        for pid in pids:
            await self.checkpoint(pid)
        return tuple(pids)

    async def restore_all(self, pids: Sequence[int]) -> float:
        for pid in pids:
            await self.restore(pid)
        return 0.0
