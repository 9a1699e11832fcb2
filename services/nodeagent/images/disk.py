"""Blocking file-tree helpers for the cache (called through ``asyncio.to_thread``)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

__all__ = ["disk_usage", "remove_tree"]


def disk_usage(path: Path) -> int:
    """Bytes of disk the tree under ``path`` takes (allocated blocks, hard links counted once,
    symlinks not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(path)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def remove_tree(path: Path) -> None:
    """Removes ``path`` and everything below it, even directories an image made read-only
    (which stop a non-root caller); a path that is already gone is fine."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    if os.geteuid() != 0:
        _open_up(str(path))
    shutil.rmtree(path)


def _open_up(top: str) -> None:
    """Gives the owner rwx on every directory under ``top`` (a non-root unpack keeps an image's
    0555 directories, whose entries the owner then cannot remove)."""
    os.chmod(top, stat.S_IRWXU | os.lstat(top).st_mode)
    for parent, dirs, _ in os.walk(top):
        for name in dirs:
            sub = os.path.join(parent, name)
            if not os.path.islink(sub):
                os.chmod(sub, stat.S_IRWXU | os.lstat(sub).st_mode)
