"""``Image``: one unpacked user image on this node, as the cache hands it out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.nodeagent.images.config import ImageConfig
from services.nodeagent.images.types import IdMap

__all__ = ["Image"]


@dataclass(frozen=True)
class Image:
    """An unpacked image on this node."""

    # The manifest digest the reference resolved to: what a revision pins.
    digest: str
    # Mount it read-only: every instance of the image shares this one directory.
    rootfs: Path
    config: ImageConfig
    # Disk taken by the rootfs.
    size_bytes: int
    # The rootfs's files belong to host uids owner.uid.. and gids owner.gid.. (container id 0 up).
    owner: IdMap
