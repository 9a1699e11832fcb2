"""Which uid, gid and groups a user image's process runs as, from its config's ``user`` and the
image's own /etc/passwd and /etc/group (as Docker resolves ``USER``).

The image's files are read as host root from an untrusted tree, so paths are resolved inside
the rootfs the way the container would see them (an absolute symlink is taken relative to the
image's root, never the host's; ``..`` stops at it), the files are read up to a size cap, and
no error message repeats their content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from snapwake import errors

__all__ = ["ImageUser", "parse_group", "parse_passwd", "read_in_root", "resolve_in_root", "resolve_user"]

_MAX_BYTES = 1 << 20
_MAX_LINKS = 40


@dataclass(frozen=True)
class ImageUser:
    """The process's identity inside the container's user namespace."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


def resolve_in_root(root: Path, path: str) -> Path | None:
    """``path`` as seen inside ``root`` (symlinks followed within it); None when it does not exist
    or loops."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        try:
            st = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(part)
    return root.joinpath(*done)


def read_in_root(root: Path, path: str) -> str | None:
    """The text of the regular file ``path`` inside ``root`` (at most 1 MiB), None if absent."""
    real = resolve_in_root(root, path)
    if real is None:
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(_MAX_BYTES).decode(errors="replace")


def parse_passwd(text: str) -> dict[str, tuple[int, int, str]]:
    """name -> (uid, gid, home) of an /etc/passwd text; malformed lines are skipped."""
    out: dict[str, tuple[int, int, str]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2].isdigit() and fields[3].isdigit():
            out.setdefault(fields[0], (int(fields[2]), int(fields[3]), fields[5] or "/"))
    return out


def parse_group(text: str) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, gid, members) of an /etc/group text; malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit():
            out.append((fields[0], int(fields[2]), tuple(m for m in fields[3].split(",") if m)))
    return out


def _bad(user: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"image user {user!r}: {why}", field="image.user")


def resolve_user(root: Path, user: str, id_limit: int) -> ImageUser:
    """``user`` ("", "name", "uid", "name:group", "uid:gid") of the image at ``root``; ids must
    be below ``id_limit`` (the size of the user namespace). InvalidArgument when it cannot be."""
    name, _, group = (user or "0").partition(":")
    passwd = parse_passwd(read_in_root(root, "/etc/passwd") or "")
    groups = parse_group(read_in_root(root, "/etc/group") or "")
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in passwd.values() if e[0] == uid), None)
        gid, home = (entry[1], entry[2]) if entry else (0, "/")  # Docker's default group: 0
    elif name in passwd:
        uid, gid, home = passwd[name]
    else:
        raise _bad(user, "no such user in the image's /etc/passwd")
    if group.isdigit():
        gid = int(group)
    elif group:
        gid = next((g[1] for g in groups if g[0] == group), -1)
        if gid < 0:
            raise _bad(user, "no such group in the image's /etc/group")
    login = next((n for n, e in passwd.items() if e[0] == uid), name)
    extra = tuple(sorted({g[1] for g in groups if login in g[2] and g[1] != gid}))
    for i in (uid, gid, *extra):
        if not 0 <= i < id_limit:
            raise _bad(user, f"id {i} is outside the container's user namespace (0..{id_limit - 1})")
    return ImageUser(uid, gid, extra, home)
