"""Driver-level checkpoint of a container's CUDA state, by the host pid of its process.

``CudaCheckpointer`` calls ``cuCheckpointProcessLock/Checkpoint`` to move what is left of a
released standby's GPU state (context, kernels: about 0.8 GB) into its host memory, and
``cuCheckpointProcessRestore/Unlock`` to bring it back (about 0.3 s on an H100).
``NoGpuCheckpointer`` is for hosts without a GPU: a CPU model server holds no device state, so
there is nothing to checkpoint and the standby is simply the released process.
The CUDA calls block, so they run in a worker thread; a failed one raises ``CudaError`` naming
the call and the pid (``snapwake.cuda``).

A container may run several processes, and any of them may hold CUDA state (a user image whose
server runs its model in a worker process, say). ``checkpoint_all`` takes the container's pids,
keeps those the driver knows as CUDA processes (``cuCheckpointProcessGetState`` answers; for a
process without CUDA it answers ``CUDA_ERROR_NOT_INITIALIZED``, seen on the H100), locks them
all before checkpointing any (so none launches work on a peer's memory mid-way), and
checkpoints each. If one fails, those already checkpointed are restored and all are unlocked,
and the error names the process (pid and command line) and, with several CUDA processes, that
processes sharing GPU memory (CUDA IPC) cannot be checkpointed by drivers before 610.
``restore_all`` restores every one, then unlocks every one.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
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

    @abc.abstractmethod
    async def checkpoint_all(self, pids: Sequence[int]) -> tuple[int, ...]:
        """Checkpoints every process of ``pids`` that holds CUDA state, all locked first; returns
        those pids (what ``restore_all`` takes). On a failure none stays checkpointed or locked."""

    @abc.abstractmethod
    async def restore_all(self, pids: Sequence[int]) -> float:
        """Restores every one of ``pids``, then unlocks them; returns seconds."""


class NoGpuCheckpointer(Checkpointer):
    """A CPU host: the process has no device state, so both steps are no-ops."""

    async def checkpoint(self, pid: int) -> float:
        return 0.0

    async def restore(self, pid: int) -> float:
        return 0.0

    async def checkpoint_all(self, pids: Sequence[int]) -> tuple[int, ...]:
        return ()

    async def restore_all(self, pids: Sequence[int]) -> float:
        return 0.0


def command_of(pid: int) -> str:
    """The process's command line, for messages ("?" once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:200] or "?"


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

    def _is_cuda(self, pid: int) -> bool:
        """Whether the driver knows ``pid`` as a CUDA process; one not RUNNING (locked or
        checkpointed already, by someone else) cannot be taken and raises."""
        status, state = self._cu.cuCheckpointProcessGetState(pid)
        if int(status) != cuda.SUCCESS:  # NOT_INITIALIZED: no CUDA there; OPERATING_SYSTEM: gone
            return False
        if int(state) != 0:  # CU_PROCESS_STATE_RUNNING
            raise cuda.CudaError(f"cuCheckpointProcessGetState({pid})",
                                 f"the process is {getattr(state, 'name', state)}, not RUNNING")
        return True

    def _checkpoint_all(self, pids: Sequence[int]) -> tuple[int, ...]:
        found = tuple(pid for pid in pids if self._is_cuda(pid))
        locked: list[int] = []
        done: list[int] = []
        lock = self._cu.CUcheckpointLockArgs()
        lock.timeoutMs = self.lock_timeout_ms
        pid = 0
        try:
            for pid in found:
                self._call("cuCheckpointProcessLock", pid, lock)
                locked.append(pid)
            for pid in found:
                self._call("cuCheckpointProcessCheckpoint", pid, self._cu.CUcheckpointCheckpointArgs())
                done.append(pid)
        except cuda.CudaError as exc:
            self._undo(done, locked)
            why = f"the driver could not checkpoint pid {pid} ({command_of(pid)}), " \
                  f"one of {len(found)} CUDA process{'es' if len(found) > 1 else ''} of the container: {exc.result}"
            if len(found) > 1:
                why += " (processes that share GPU memory through CUDA IPC cannot be checkpointed by drivers before 610)"
            raise cuda.CudaError(exc.call, why) from exc
        return found

    def _undo(self, done: Sequence[int], locked: Sequence[int]) -> None:
        """After a failed group checkpoint: restores what was checkpointed, unlocks what was locked."""
        for pid in done:
            try:
                self._call("cuCheckpointProcessRestore", pid, self._cu.CUcheckpointRestoreArgs())
            except cuda.CudaError:
                log.exception("restore of pid %d after a failed group checkpoint", pid)
        for pid in locked:
            try:
                self._call("cuCheckpointProcessUnlock", pid, self._cu.CUcheckpointUnlockArgs())
            except cuda.CudaError:
                log.exception("unlock of pid %d after a failed group checkpoint", pid)

    def _restore_all(self, pids: Sequence[int]) -> float:
        start = time.perf_counter()
        for pid in pids:
            self._call("cuCheckpointProcessRestore", pid, self._cu.CUcheckpointRestoreArgs())
        for pid in pids:
            self._call("cuCheckpointProcessUnlock", pid, self._cu.CUcheckpointUnlockArgs())
        return time.perf_counter() - start

    async def checkpoint_all(self, pids: Sequence[int]) -> tuple[int, ...]:
        start = time.perf_counter()
        found = await asyncio.to_thread(self._checkpoint_all, tuple(pids))
        log.info("checkpointed CUDA pids %s of %s in %.3fs", list(found), list(pids), time.perf_counter() - start)
        return found

    async def restore_all(self, pids: Sequence[int]) -> float:
        seconds = await asyncio.to_thread(self._restore_all, tuple(pids))
        log.info("restored pids %s in %.3fs", list(pids), seconds)
        return seconds

    async def checkpoint(self, pid: int) -> float:
        seconds = await asyncio.to_thread(self._checkpoint, pid)
        log.info("checkpointed pid %d in %.3fs", pid, seconds)
        return seconds

    async def restore(self, pid: int) -> float:
        seconds = await asyncio.to_thread(self._restore, pid)
        log.info("restored pid %d in %.3fs", pid, seconds)
        return seconds
