"""Small value types shared by the image modules (imports nothing else from the package)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IdMap"]


@dataclass(frozen=True)
class IdMap:
    """Who owns an unpacked rootfs on the host: container uid/gid ``n`` (``0 <= n < size``) is
    host uid ``uid + n`` and gid ``gid + n``; a container's user namespace must map the same."""

    uid: int
    gid: int
    # How many ids are mapped; 1 for a rootless unpack (every file belongs to the caller).
    size: int = 65536

    def option(self) -> str:
        """The uid or gid map in the form umoci and newuidmap take: "0:HOST:SIZE" (uid side)."""
        return f"0:{self.uid}:{self.size}"
