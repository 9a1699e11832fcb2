"""Device-memory arena through the CUDA virtual memory API (measured in probes/ipc_model.py).

A virtual address range is reserved once, then physical memory is mapped into it: created here
(``cuMemCreate`` with a POSIX-fd handle type, so it can be exported to the blobstore) or
imported from a file descriptor the blobstore handed over. ``release`` unmaps and frees the
physical memory but keeps the reservation, so tensor pointers (and captured CUDA graphs) stay
valid for the next ``attach`` at the same address.

With ``trim`` (the default), ``release`` also shrinks what the driver checkpoint of a standby
moves into host memory: the context's per-thread stack (local memory, sized for every thread the
GPU can hold, and never shrunk by the driver on its own) goes down to ``TRIM_STACK_BYTES``, and
torch's cached pinned host blocks are freed. The next ``allocate`` or ``attach`` sets the stack
back to what it was, so the kernels run as before (the driver also grows it for any kernel that
needs more: ``cuCtxSetLimit``).

Driver calls go through ``snapwake.cuda`` (lazy import of ``cuda.bindings``, so importing this
module on a machine without CUDA works; a failed call raises ``CudaError`` naming it).
"""

from __future__ import annotations

import gc
import logging
import os
from typing import TYPE_CHECKING, Any

from snapwake.cuda import CudaError, check, driver
from snapwake.errors import FailedPrecondition

if TYPE_CHECKING:
    import torch

__all__ = ["TRIM_STACK_BYTES", "CudaArena"]

log = logging.getLogger(__name__)

# The per-thread stack a released arena leaves the context with (the driver's default is 1 KiB,
# times every thread the GPU holds at once: about 260 MiB of local memory on an H100).
TRIM_STACK_BYTES = 0
FALLBACK_STACK_BYTES = 256  # where a driver refuses 0


class _Cai:
    """Presents a raw device range to ``torch.as_tensor`` as a flat uint8 array."""

    def __init__(self, ptr: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3}


class CudaArena:
    """An ``Arena`` in device memory of one GPU."""

    def __init__(self, gpu_index: int, reserve_bytes: int = 0, ordinal: int = -1, trim: bool = True) -> None:
        self.gpu = gpu_index
        self.trim = trim
        self._stack_bytes = 0  # the stack limit before a trim shrank it (0: not shrunk)
        self.ordinal = gpu_index if ordinal < 0 else ordinal
        self._reserve_bytes = reserve_bytes
        self._ctx: Any = None
        self._va = 0
        self._va_size = 0
        self._handle: Any = None
        self._mapped = 0
        self._granularity = 0

    @property
    def size(self) -> int:
        return self._mapped

    def _enter(self) -> Any:
        """Makes torch's primary context current in this thread (calls arrive from workers)."""
        cu = driver()
        if self._ctx is None:
            import torch

            torch.cuda.set_device(self.ordinal)
            torch.cuda.init()
            check(cu.cuInit(0), "cuInit")
            dev = check(cu.cuDeviceGet(self.ordinal), "cuDeviceGet")
            self._ctx = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            self._granularity = int(check(cu.cuMemGetAllocationGranularity(
                self._prop(), cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                "cuMemGetAllocationGranularity"))
        check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        return cu

    def _prop(self) -> Any:
        cu = driver()
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.ordinal
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return prop

    def _round(self, size: int) -> int:
        g = self._granularity
        return (max(size, 1) + g - 1) // g * g

    def _reserve(self, size: int) -> None:
        cu = driver()
        if self._va == 0:
            self._va_size = self._round(max(size, self._reserve_bytes))
            self._va = int(check(cu.cuMemAddressReserve(self._va_size, 0, 0, 0), "cuMemAddressReserve"))
        elif size > self._va_size:
            raise FailedPrecondition(f"arena of {size} bytes does not fit the reserved {self._va_size}")

    def _map(self, handle: Any, size: int) -> None:
        cu = driver()
        try:
            check(cu.cuMemMap(self._va, size, 0, handle, 0), "cuMemMap")
        except CudaError:
            cu.cuMemRelease(handle)
            raise
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.ordinal
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        check(cu.cuMemSetAccess(self._va, size, [access], 1), "cuMemSetAccess")
        self._handle, self._mapped = handle, size

    def allocate(self, size: int) -> None:
        self._check_empty()
        cu = self._enter()
        self._restore_stack(cu)
        size = self._round(size)
        self._reserve(size)
        self._map(check(cu.cuMemCreate(size, self._prop(), 0), "cuMemCreate"), size)

    def attach(self, fd: int, size: int) -> None:
        self._check_empty()
        try:
            cu = self._enter()
            self._restore_stack(cu)
            handle = check(cu.cuMemImportFromShareableHandle(
                fd, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                "cuMemImportFromShareableHandle")
        finally:
            os.close(fd)  # the imported handle keeps the memory alive
        size = self._round(size)
        self._reserve(size)
        self._map(handle, size)

    def tensor(self) -> torch.Tensor:
        import torch

        if not self._mapped:
            raise FailedPrecondition("the arena is not mapped")
        return torch.as_tensor(_Cai(self._va, self._mapped), device=f"cuda:{self.ordinal}")

    def export_fd(self) -> int:
        if not self._mapped:
            raise FailedPrecondition("the arena is not mapped")
        cu = self._enter()
        return int(check(cu.cuMemExportToShareableHandle(
            self._handle, cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle"))

    def release(self) -> None:
        import torch

        if not self._mapped:
            return
        cu = self._enter()
        torch.cuda.synchronize(self.ordinal)
        check(cu.cuMemUnmap(self._va, self._mapped), "cuMemUnmap")
        check(cu.cuMemRelease(self._handle), "cuMemRelease")
        self._handle, self._mapped = None, 0
        # cuBLAS keeps its workspace in the caching allocator (32 MiB on Hopper); drop it so the
        # driver checkpoint of the standby has as little device state as possible to move.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        gc.collect()  # KV caches caught in reference cycles hold caching-allocator blocks
        torch.cuda.empty_cache()  # the KV cache and activations go back to the driver too
        untrimmed = torch.cuda.mem_get_info(self.ordinal)[0]
        if self.trim:
            self._trim(cu)
        free, total = torch.cuda.mem_get_info(self.ordinal)
        log.info("released arena: torch allocated %d MiB, reserved %d MiB; device free %d of %d MiB "
                 "(%d MiB before the trim)", torch.cuda.memory_allocated(self.ordinal) >> 20,
                 torch.cuda.memory_reserved(self.ordinal) >> 20, free >> 20, total >> 20, untrimmed >> 20)

    def _trim(self, cu: Any) -> None:
        """Shrinks the context's local memory and frees torch's cached pinned host memory (see
        the module docstring); a driver that refuses leaves things as they were."""
        import torch

        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()
        limit = cu.CUlimit.CU_LIMIT_STACK_SIZE
        try:
            current = int(check(cu.cuCtxGetLimit(limit), "cuCtxGetLimit(STACK_SIZE)"))
        except CudaError as exc:
            log.warning("release: cannot read the per-thread stack limit: %s", exc.message)
            return
        for value in (TRIM_STACK_BYTES, FALLBACK_STACK_BYTES):
            if value >= current:
                return
            try:
                check(cu.cuCtxSetLimit(limit, value), f"cuCtxSetLimit(STACK_SIZE, {value})")
            except CudaError as exc:
                log.warning("release: cannot shrink the per-thread stack: %s", exc.message)
                continue
            self._stack_bytes = max(self._stack_bytes, current)
            log.info("release: per-thread stack %d -> %d bytes", current, value)
            return

    def _restore_stack(self, cu: Any) -> None:
        """Sets the stack limit back to what it was before the last trim."""
        if self._stack_bytes:
            check(cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, self._stack_bytes), "cuCtxSetLimit(STACK_SIZE)")
            self._stack_bytes = 0

    def _check_empty(self) -> None:
        if self._mapped:
            raise FailedPrecondition("the arena is already mapped; release it first")
