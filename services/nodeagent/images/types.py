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

    @property
    def rootless(self) -> bool:
        """Whether the files simply belong to the (non-root) user that unpacked them."""
        return self.size == 1

    def uid_map(self) -> str:
        """The uid map as umoci takes it: "CONTAINER:HOST:SIZE"."""
        return f"0:{self.uid}:{self.size}"

    def gid_map(self) -> str:
        return f"0:{self.gid}:{self.size}"
