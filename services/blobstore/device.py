"""Exportable memory: fill it from the cache, hand its file descriptor over, import one back.

Two backends behind one interface:

- ``MemfdLoader`` (hosts without a GPU): the arena is a ``memfd``. Those it sends are sealed
  against shrinking and growing; one it is given must be too (``snapwake.protocols``).
- ``CudaLoader``: ``cuMemCreate`` with a POSIX file-descriptor handle on the named GPU, DMA
  from the pinned cache in 256 MiB chunks on a stream, ``cuMemExportToShareableHandle``
  (the sequence measured in ``probes/ipc_loader.py``: 16 GiB in about 0.35 s).

Driver calls go through ``snapwake.cuda``: a failed one raises ``CudaError`` naming it (out of
memory answers as ResourceExhausted, anything else as Unavailable), and ``cuda.bindings`` is
imported lazily so this module imports on any host.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from services.blobstore.cache import CacheEntry, HostArena
from services.blobstore.stream import Sink
from snapwake import errors
from snapwake.cuda import check, driver
from snapwake.protocols import memfd_problem, seal_memfd

__all__ = ["CudaLoader", "Exported", "Loader", "MemfdLoader", "cuda_device_count", "pinned_arena"]

DMA_CHUNK = 256 << 20  # large copies reach ~55 GB/s from pinned memory


@dataclasses.dataclass
class Exported:
    """Filled exportable memory. ``release`` frees the loader's side (after the client mapped it)."""

    fd: int
    nbytes: int
    alloc_bytes: int
    dma_seconds: float
    release: Callable[[], None]


class Loader(Protocol):
    def export(self, entry: CacheEntry, gpu: int) -> Exported:
        """Allocates exportable memory, fills it with ``entry``'s bytes, returns its fd."""

    def import_into(self, fd: int, nbytes: int, gpu: int, dest: memoryview, dest_address: int) -> None:
        """Copies the first ``nbytes`` of the memory behind ``fd`` into ``dest``."""

    def export_stream(self, nbytes: int, gpu: int, fill: Callable[[Sink], object]) -> Exported:
        """Allocates exportable memory of ``nbytes`` and calls ``fill(sink)``, which hands every
        chunk to ``sink`` (from any thread) before it returns; then exports it. The memory is
        freed if ``fill`` raises. ``dma_seconds`` is the whole fill."""


def _close(fd: int) -> Callable[[], None]:
    return lambda: os.close(fd)


class MemfdLoader:
    """Host memory in a memfd: the same protocol as the GPU path, for CPU hosts and CI."""

    def export(self, entry: CacheEntry, gpu: int) -> Exported:
        n = entry.manifest.arena_bytes
        t0 = time.perf_counter()
        fd = os.memfd_create(f"snapwake-{entry.manifest.snapshot_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, n)
            seal_memfd(fd)  # the receiver refuses a memfd that could shrink under its mapping
            if n:
                with mmap.mmap(fd, n) as dst:
                    dst[:] = entry.view
        except BaseException:
            os.close(fd)
            raise
        return Exported(fd, n, n, time.perf_counter() - t0, _close(fd))

    def export_stream(self, nbytes: int, gpu: int, fill: Callable[[Sink], object]) -> Exported:
        fd = os.memfd_create("snapwake-stream", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            seal_memfd(fd)
            t0 = time.perf_counter()
            if nbytes:
                with mmap.mmap(fd, nbytes) as dst:
                    def sink(offset: int, data: memoryview, _address: int) -> None:
                        dst[offset:offset + len(data)] = data
                    fill(sink)
            else:
                fill(lambda _o, _d, _a: None)
            seconds = time.perf_counter() - t0
        except BaseException:
            os.close(fd)
            raise
        return Exported(fd, nbytes, nbytes, seconds, _close(fd))

    def import_into(self, fd: int, nbytes: int, gpu: int, dest: memoryview, dest_address: int) -> None:
        # Unsealed, the sender could shrink the memfd under our mapping: SIGBUS, the blobstore gone.
        if (problem := memfd_problem(fd)) is not None:
            raise errors.InvalidArgument(problem, field="fd")
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise errors.InvalidArgument(
                f"manifest.arena_bytes: {nbytes} but the memfd holds only {size} bytes", field="manifest.arena_bytes")
        if nbytes:
            with mmap.mmap(fd, nbytes, prot=mmap.PROT_READ) as src:
                dest[:nbytes] = src


def cuda_device_count() -> int:
    """Number of CUDA devices; 0 when there is no driver or no GPU."""
    try:
        cu = driver()
        check(cu.cuInit(0), "cuInit")
        return int(check(cu.cuDeviceGetCount(), "cuDeviceGetCount"))
    except Exception:  # noqa: BLE001 - a failed call or no driver library at all is "no GPU"
        return 0


def _use_device(gpu: int) -> None:
    """Makes ``gpu``'s primary context current in this thread (CUDA contexts are per thread)."""
    cu = driver()
    check(cu.cuInit(0), "cuInit")
    dev = check(cu.cuDeviceGet(gpu), f"cuDeviceGet({gpu})")
    ctx = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def pinned_arena(capacity: int, gpu: int = 0) -> HostArena:
    """One page-locked buffer for the whole cache, allocated once at start-up (portable to all GPUs)."""
    cu = driver()
    _use_device(gpu)
    ptr = int(check(cu.cuMemHostAlloc(max(capacity, 1), cu.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc"))
    view = memoryview((ctypes.c_ubyte * max(capacity, 1)).from_address(ptr)).cast("B")
    return HostArena(view[:capacity], ptr, True, lambda: check(cu.cuMemFreeHost(ptr), "cuMemFreeHost"))


class CudaLoader:
    """Device memory from ``cuMemCreate``, exported and imported as a POSIX file descriptor."""

    def _prop(self, gpu: int) -> Any:
        cu = driver()
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = gpu
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return prop

    def _mapped(self, handle: Any, size: int, prop: Any) -> Any:
        """Reserves a VA range, maps ``handle`` there and grants read-write access."""
        cu = driver()
        va = check(cu.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve")
        check(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
        acc = cu.CUmemAccessDesc()
        acc.location = prop.location
        acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        check(cu.cuMemSetAccess(va, size, [acc], 1), "cuMemSetAccess")
        return va

    def _size(self, nbytes: int, prop: Any) -> int:
        cu = driver()
        gran = int(check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity"))
        return max(gran, -(-nbytes // gran) * gran)

    def _copy(self, va: Any, host: int, nbytes: int, to_device: bool) -> float:
        cu = driver()
        stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        t0 = time.perf_counter()
        try:
            for off in range(0, nbytes, DMA_CHUNK):
                n = min(DMA_CHUNK, nbytes - off)
                if to_device:
                    check(cu.cuMemcpyHtoDAsync(int(va) + off, host + off, n, stream), "cuMemcpyHtoDAsync")
                else:
                    check(cu.cuMemcpyDtoHAsync(host + off, int(va) + off, n, stream), "cuMemcpyDtoHAsync")
            check(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        finally:
            cu.cuStreamDestroy(stream)
        return time.perf_counter() - t0

    def export(self, entry: CacheEntry, gpu: int) -> Exported:
        return self._exported(entry.manifest.arena_bytes, gpu,
                              lambda va: self._copy(va, entry.address, entry.manifest.arena_bytes, to_device=True))

    def export_stream(self, nbytes: int, gpu: int, fill: Callable[[Sink], object]) -> Exported:
        cu = driver()

        def stream_in(va: Any) -> float:
            base = int(va)

            def sink(offset: int, data: memoryview, address: int) -> None:
                # Called from the reader threads: each makes the context current and waits for its
                # own copy, so the staging buffer may be reused once this returns.
                _use_device(gpu)
                stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
                try:
                    check(cu.cuMemcpyHtoDAsync(base + offset, address, len(data), stream), "cuMemcpyHtoDAsync")
                    check(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
                finally:
                    cu.cuStreamDestroy(stream)
            t0 = time.perf_counter()
            fill(sink)
            return time.perf_counter() - t0
        return self._exported(nbytes, gpu, stream_in)

    def _exported(self, nbytes: int, gpu: int, fill: Callable[[Any], float]) -> Exported:
        """Exportable memory for ``nbytes`` on ``gpu``, mapped and filled by ``fill(va)`` (which
        returns the seconds its copy took), then exported as an fd; freed again on any failure."""
        cu = driver()
        _use_device(gpu)
        prop = self._prop(gpu)
        size = self._size(nbytes, prop)
        handle = check(cu.cuMemCreate(size, prop, 0), f"cuMemCreate({size}) on gpu {gpu}")
        va = None
        try:
            va = self._mapped(handle, size, prop)
            seconds = fill(va)
            fd = int(check(cu.cuMemExportToShareableHandle(
                handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
                "cuMemExportToShareableHandle"))
        except BaseException:
            self._free(va, size, handle, None)
            raise
        return Exported(fd, nbytes, size, seconds, lambda: self._free(va, size, handle, fd))

    def _free(self, va: Any, size: int, handle: Any, fd: int | None) -> None:
        cu = driver()
        if va is not None:
            cu.cuMemUnmap(va, size)
            cu.cuMemAddressFree(va, size)
        cu.cuMemRelease(handle)
        if fd is not None:
            os.close(fd)

    def import_into(self, fd: int, nbytes: int, gpu: int, dest: memoryview, dest_address: int) -> None:
        cu = driver()
        _use_device(gpu)
        prop = self._prop(gpu)
        size = self._size(nbytes, prop)  # a prefix of the model server's (maybe larger) allocation
        handle = check(cu.cuMemImportFromShareableHandle(
            fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), "cuMemImportFromShareableHandle")
        va = None
        try:
            va = self._mapped(handle, size, prop)
            self._copy(va, dest_address, nbytes, to_device=False)
        finally:
            self._free(va, size, handle, None)
