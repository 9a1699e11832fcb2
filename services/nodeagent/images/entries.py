"""The cache's directories (blocking; the cache calls in through ``asyncio.to_thread`` where an
image's tree is walked)::

    images/sha256-<hex>/rootfs/       a complete unpacked image
    images/sha256-<hex>/image.json    digest, image config, size, owner; mtime = last use
    scratch/                          unpacks in progress and trees being removed

An unpack fills ``scratch/<x>/entry/`` and is renamed into ``images/`` whole, and a removal
renames first, so ``images/`` only ever holds complete images, whatever a crash interrupts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from services.nodeagent.images.config import parse_config
from services.nodeagent.images.disk import disk_usage, remove_tree
from services.nodeagent.images.image import Image
from services.nodeagent.images.types import IdMap
from snapwake import errors

__all__ = ["DiskIndex"]

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"sha256-([0-9a-f]{64})")


class DiskIndex:
    """``images/`` and ``scratch/`` under ``root``, for images owned by ``owner``."""

    def __init__(self, root: Path, owner: IdMap) -> None:
        self.images, self.scratch, self.owner = root / "images", root / "scratch", owner
        for path, mode in ((root, 0o711), (self.images, 0o711), (self.scratch, 0o700)):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)  # the containers' mapped root must be able to reach its rootfs

    def load(self) -> list[Image]:
        """The complete images, least recently used first; empties scratch and discards what is
        incomplete or was unpacked for another owner."""
        for leftover in self.scratch.iterdir():
            remove_tree(leftover)
        found = []
        for path in self.images.iterdir():
            image = self._read(path)
            if image is None:
                log.warning("image cache: discarding %s (incomplete or from another configuration)", path.name)
                remove_tree(self.retire(path))
            else:
                found.append((os.stat(path / "image.json").st_mtime_ns, image))
        return [image for _, image in sorted(found, key=lambda f: f[0])]

    def stage(self, digest: str) -> Path:
        """A fresh scratch directory with an empty ``entry/`` for an unpack to fill (as
        ``entry/rootfs``); the caller removes it."""
        work = Path(tempfile.mkdtemp(prefix=digest[7:19] + "-", dir=self.scratch))
        (work / "entry").mkdir()
        (work / "entry").chmod(0o711)
        return work

    def commit(self, staged: Path, digest: str, meta: dict[str, Any]) -> tuple[Path, int]:
        """Measures the unpacked rootfs, writes ``image.json`` and renames ``staged`` into
        ``images/``. Returns (its rootfs, its size)."""
        size = disk_usage(staged / "rootfs")
        (staged / "image.json").write_text(json.dumps({**meta, "digest": digest, "size_bytes": size,
                                                       "owner": [self.owner.uid, self.owner.gid, self.owner.size]}))
        final = self.images / f"sha256-{digest[7:]}"
        if final.exists():  # a discarded entry whose removal failed
            self.retire(final)
        os.rename(staged, final)
        return final / "rootfs", size

    def retire(self, path: Path) -> Path:
        """Moves an entry into scratch (out of ``images/`` at once); returns what to remove."""
        grave = Path(tempfile.mkdtemp(prefix="removed-", dir=self.scratch))
        os.rename(path, grave / "x")
        return grave

    def touch(self, image: Image) -> None:
        """Records a use (the entry's mtime orders eviction after a restart)."""
        try:
            os.utime(image.rootfs.parent / "image.json")
        except OSError as exc:
            log.warning("image %s: cannot record its use: %s", image.digest, exc)

    def _read(self, path: Path) -> Image | None:
        match = _ENTRY.fullmatch(path.name)
        rootfs = path / "rootfs"
        if match is None or path.is_symlink() or rootfs.is_symlink() or not rootfs.is_dir():
            return None
        try:
            meta = json.loads((path / "image.json").read_text())
            image = Image(meta["digest"], rootfs, parse_config(meta["config"]), int(meta["size_bytes"]),
                          IdMap(*meta["owner"]))
        except (OSError, ValueError, KeyError, TypeError, errors.InvalidArgument):
            return None
        return image if image.digest == f"sha256:{match.group(1)}" and image.owner == self.owner else None
