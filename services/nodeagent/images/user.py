"""The numeric uid and gid an image's ``User`` runs as, resolved the way runc and Docker do.

``parse_user`` is pure (over the texts of the image's /etc/passwd and /etc/group);
``resolve_user`` reads those two files from an unpacked rootfs without following a symlink, so
an image cannot point them at the host's files. Supplementary groups are not looked up.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from snapwake import errors

__all__ = ["parse_user", "resolve_user"]

_FIELD = "spec.image"
_MAX_FILE = 1 << 20


def parse_user(user: str, passwd: str, group: str, max_id: int = 65535) -> tuple[int, int]:
    """(uid, gid) for ``user`` ("", "name", "uid", with ":group" or ":gid"). A numeric uid need
    not be in passwd (its gid is then 0); a name must be. Ids above ``max_id`` are refused (the
    container's user namespace maps no more)."""
    name, _, group_name = user.partition(":")
    uid, gid = _lookup_user(name, passwd)
    if group_name:
        gid = _lookup(group_name, group, "/etc/group")[0]
    if uid > max_id or gid > max_id:
        raise _bad(f"image user {user!r} is {uid}:{gid}; the container maps ids 0..{max_id} only")
    return uid, gid


def resolve_user(user: str, rootfs: Path, max_id: int = 65535) -> tuple[int, int]:
    """``parse_user`` over ``rootfs``'s /etc/passwd and /etc/group (absent ones read as empty)."""
    return parse_user(user, _read_etc(rootfs, "passwd"), _read_etc(rootfs, "group"), max_id)


def _lookup_user(name: str, passwd: str) -> tuple[int, int]:
    if not name:
        return 0, 0
    if name.isdigit():
        found = [e for e in _entries(passwd) if e[2] == name]
        return int(name), int(found[0][3]) if found and found[0][3].isdigit() else 0
    return _lookup(name, passwd, "/etc/passwd")


def _lookup(name: str, text: str, path: str) -> tuple[int, int]:
    """(id, gid) of ``name`` in a passwd-like file; a number stands for itself."""
    if name.isdigit():
        return int(name), int(name)
    for entry in _entries(text):
        if entry[0] == name and entry[2].isdigit():
            return int(entry[2]), int(entry[3]) if len(entry) > 3 and entry[3].isdigit() else 0
    raise _bad(f"image user {name!r} is not in the image's {path}")


def _entries(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")
            and line.count(":") >= 2]


def _read_etc(rootfs: Path, name: str) -> str:
    """``rootfs/etc/NAME``, never through a symlink; "" when absent or not a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.ExitStack() as stack:
        try:
            root = os.open(rootfs, flags | os.O_DIRECTORY)
            stack.callback(os.close, root)
            etc = os.open("etc", flags | os.O_DIRECTORY, dir_fd=root)
            stack.callback(os.close, etc)
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=etc)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return ""
            return f.read(_MAX_FILE).decode(errors="replace")
    return ""


def _bad(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{_FIELD}: {message}", field=_FIELD)
