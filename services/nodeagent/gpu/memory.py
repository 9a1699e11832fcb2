"""GPU memory per process (NVML), and the rule that stops an instance over its GPU memory slice.

The driver has no per-process memory limit on a whole GPU (the device cgroup decides which GPU,
not how much of it), so a slice is enforced by watching. Every reconcile pass the nodeagent reads
the GPU memory of every process on the node once (``NvmlProcessMemory``, in a worker thread with a
bound: ``ProcessMemoryReader``), sums it over the processes of each serving instance's container
(``used_by``) and ends an instance whose sum is over its limit (``SliceLimit``) FAILED with
the limit's ``reason``. Between two passes an instance can take memory from its neighbours;
the scheduler's slices remain the admission rule.

What NVML counts: everything a process holds on the device, its CUDA context included (about
0.5 GiB per process). NVML reports host pids; the nodeagent runs in the host's pid namespace and
``Containers.pids`` gives host pids too. A pid on several GPUs is summed over them.

The limit (``SliceLimit.of``):

- A user image: its slice, context included. The scheduler packs slices onto a GPU up to its
  total memory and counts nothing else, so whatever a user image holds beyond its slice is taken
  from its neighbours: the slice it declares must hold its contexts too.
- The built-in model server: its slice plus ``builtin_allowance``
  (``gpu_memory_builtin_allowance_bytes``, 2 GiB by default). It keeps its weight arena and
  PyTorch's allocator inside the slice itself (``modelserver.budget``), but not its CUDA context,
  kernel images and driver buffers, which no pool of its own can cap: about 0.8 GB for an 8B
  instance (what the driver checkpoint of a released one moves, ``gpu.checkpoint``). The
  allowance is more than twice that, so a healthy built-in instance is never stopped; for it the
  watch is a backstop against memory taken outside its pools.
- No slice (0): not watched.

Only serving instances (``WATCHED``: RUNNING, IDLE) are checked: a standby holds no GPU memory by
design, and a starting or restoring one is still mapping its memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from snapwake.lifecycle import SERVING

__all__ = ["READ_TIMEOUT_S", "WATCHED", "FakeProcessMemory", "NvmlProcessMemory", "ProcessMemory",
           "ProcessMemoryReader", "SliceLimit", "used_by"]

log = logging.getLogger(__name__)

ProcessMemory = Callable[[], Mapping[int, int] | None]
"""Host pid -> GPU memory bytes, for every process on the node's GPUs; None when it cannot be read."""

# The states whose GPU memory is watched.
WATCHED = SERVING
# An NVML read takes milliseconds; one stuck in the driver must not hold up the reconcile pass.
READ_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SliceLimit:
    """What one instance's processes may hold together on its GPU."""

    slice_bytes: int
    """Its slice (``Instance.gpu_memory_bytes``); 0: none, not watched."""
    allowance: int = 0
    """What it may hold beyond the slice: the built-in model server's CUDA context."""

    @classmethod
    def of(cls, slice_bytes: int, user_image: bool, builtin_allowance: int) -> SliceLimit:
        """The limit of a user image (its slice) or of the built-in model server (plus the allowance)."""
        return cls(slice_bytes, 0 if user_image else builtin_allowance)

    def over(self, used: int) -> bool:
        """Whether holding ``used`` bytes stops the instance."""
        return self.slice_bytes > 0 and used > self.slice_bytes + self.allowance

    def reason(self, used: int, gpu_index: int) -> str:
        """The FAILED message of an instance stopped for holding ``used`` bytes on ``gpu_index``."""
        text = f"over its GPU memory slice: used {used >> 20} MiB of {self.slice_bytes >> 20} MiB on GPU {gpu_index}"
        if self.allowance:
            text += f" (the built-in model server may use {self.allowance >> 20} MiB more for its CUDA context)"
        return text


def used_by(pids: Iterable[int], usage: Mapping[int, int]) -> int:
    """The GPU memory ``pids`` hold together (a pid NVML does not list holds none)."""
    return sum(usage.get(pid, 0) for pid in set(pids))


class NvmlProcessMemory:
    """A ``ProcessMemory`` through NVML, initialised on the first read and kept until ``close``.
    Without NVML (no driver: a CPU node, CI) it says so once and reads None from then on."""

    def __init__(self, nvml: Any = None) -> None:
        """``nvml`` is the NVML module; by default ``pynvml``, imported on the first read."""
        self._nvml: Any = nvml
        self._ready = False
        self._off = False
        self._failing = ""  # the last read error, logged once while it repeats

    def __call__(self) -> dict[int, int] | None:
        nvml = self._open()
        if nvml is None:
            return None
        try:
            usage = self._read(nvml)
        except nvml.NVMLError as exc:  # a GPU fell off the bus: judge nothing rather than guess
            if str(exc) != self._failing:
                log.warning("cannot read per-process GPU memory: %s", exc)
                self._failing = str(exc)
            return None
        self._failing = ""
        return usage

    def close(self) -> None:
        """Shuts NVML down if this reader started it."""
        if self._ready:
            self._ready = False
            self._nvml.nvmlShutdown()

    def _open(self) -> Any:
        if self._ready or self._off:
            return self._nvml if self._ready else None
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError or NVMLError: no driver, the watch is off
            log.info("GPU memory watch off: NVML unavailable (%s)", exc)
            self._off = True
            return None
        self._ready = True
        return self._nvml

    @staticmethod
    def _read(nvml: Any) -> dict[int, int]:
        usage: dict[int, int] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            on_device: dict[int, int] = {}
            for listed in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in listed(handle):
                    # None when the driver cannot tell; a process in both lists is one process.
                    used = int(proc.usedGpuMemory or 0)
                    on_device[int(proc.pid)] = max(on_device.get(int(proc.pid), 0), used)
            for pid, used in on_device.items():
                usage[pid] = usage.get(pid, 0) + used
        return usage


class FakeProcessMemory:
    """A ``ProcessMemory`` that reports ``usage`` as it is set (None: no NVML), for tests; counts
    its reads."""

    def __init__(self, usage: Mapping[int, int] | None = None) -> None:
        self.usage: Mapping[int, int] | None = usage if usage is not None else {}
        self.reads = 0

    def __call__(self) -> Mapping[int, int] | None:
        self.reads += 1
        return self.usage


class ProcessMemoryReader:
    """Reads a ``ProcessMemory`` in a worker thread (NVML calls block), at most ``timeout_s`` and
    one read at a time: while a read stuck in the driver is still running, the next reads None."""

    def __init__(self, source: ProcessMemory, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.source, self.timeout_s = source, timeout_s
        self._pending: asyncio.Future[Mapping[int, int] | None] | None = None

    async def read(self) -> Mapping[int, int] | None:
        """What the source reports, or None (unreadable, too slow or failed: nothing to judge)."""
        if self._pending is not None and not self._pending.done():
            return None
        self._pending = asyncio.ensure_future(asyncio.to_thread(self.source))
        try:
            return await asyncio.wait_for(asyncio.shield(self._pending), self.timeout_s)
        except TimeoutError:
            log.warning("per-process GPU memory not read within %.1fs; not judged this pass", self.timeout_s)
            self._pending.add_done_callback(_discard)
            return None
        except Exception:  # noqa: BLE001 - a broken source must not stop the reconcile pass
            log.exception("reading per-process GPU memory failed")
            return None


def _discard(future: asyncio.Future[Any]) -> None:
    """Retrieves a late read's outcome so that asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()
