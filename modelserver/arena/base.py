"""The arena interface shared by the memfd and CUDA backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["Arena"]


class Arena(Protocol):
    """One contiguous region holding every weight.

    Lifecycle: empty -> ``allocate`` or ``attach`` -> mapped -> ``release`` -> empty -> ...
    ``tensor()`` is only valid while mapped; callers drop every view before ``release``.
    """

    gpu: int
    """The GPU index for the handover protocol: the node's (-1 for host memory)."""
    ordinal: int
    """The CUDA device ordinal in this process (-1 for host memory); 0 in a sandboxed container,
    which sees only its own GPU."""

    @property
    def size(self) -> int:
        """Bytes mapped now (0 when released)."""

    def allocate(self, size: int) -> None:
        """Creates fresh exportable memory of at least ``size`` bytes and maps it."""

    def attach(self, fd: int, size: int) -> None:
        """Maps memory handed over as ``fd`` (takes ownership of the fd)."""

    def tensor(self) -> torch.Tensor:
        """The whole arena as a flat uint8 tensor on the arena's device."""

    def export_fd(self) -> int:
        """A new file descriptor for the mapped memory; the caller closes it."""

    def release(self) -> None:
        """Unmaps and frees the memory (the CUDA backend keeps its address range reserved)."""
