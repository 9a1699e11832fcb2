"""Host-memory arena in a memfd: what a machine without a GPU runs, with the same handover.

The arena is a ``memfd`` mapped with ``mmap``, sealed against shrinking and growing as the
handover requires; tensors are ``torch.frombuffer`` views. Python's mmap refuses to close while
views exist, so ``release`` needs every view dropped first (the model rebinds its parameters to
meta tensors before it calls ``release``).
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
from typing import TYPE_CHECKING

from snapwake.errors import FailedPrecondition
from snapwake.protocols import seal_memfd

if TYPE_CHECKING:
    import torch

__all__ = ["MemfdArena"]

log = logging.getLogger(__name__)


class MemfdArena:
    """An ``Arena`` backed by a memfd."""

    gpu = -1
    ordinal = -1

    def __init__(self) -> None:
        self._fd = -1
        self._map: mmap.mmap | None = None

    @property
    def size(self) -> int:
        return len(self._map) if self._map is not None else 0

    def allocate(self, size: int) -> None:
        self._check_empty()
        fd = os.memfd_create("snapwake-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, max(size, 1))
            seal_memfd(fd)  # the blobstore refuses a memfd that could shrink under its mapping on store
            self._map = mmap.mmap(fd, max(size, 1), access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def attach(self, fd: int, size: int) -> None:
        self._check_empty()
        # Copy-on-write: weights are only read, and a private mapping also works when the
        # blobstore sealed its memfd against writes.
        try:
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            os.close(fd)
            raise
        self._fd = fd

    def tensor(self) -> torch.Tensor:
        import torch

        if self._map is None:
            raise FailedPrecondition("the arena is not mapped")
        return torch.frombuffer(self._map, dtype=torch.uint8)

    def export_fd(self) -> int:
        if self._fd < 0:
            raise FailedPrecondition("the arena is not mapped")
        return os.dup(self._fd)

    def release(self) -> None:
        if self._map is not None:
            gc.collect()  # views in reference cycles would keep the mapping exported
            try:
                self._map.close()
            except BufferError:
                # A view is still alive somewhere; the pages go when it does.
                log.warning("arena views still alive at release; memory is freed when they go")
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_empty(self) -> None:
        if self._map is not None:
            raise FailedPrecondition("the arena is already mapped; release it first")
