"""Binding handover sockets: the node socket, and one socket in an instance's own directory.

An instance directory is bound read-write into its container, so its entries are the
container's to change at any moment: nothing here follows a symlink there (the mode is set
without following one, removal never follows one) and a socket file is only ever removed by us
while it is still the inode we bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from snapwake import errors

__all__ = ["SOCKET_NAME", "Bound", "bind_instance", "bind_node"]

SOCKET_NAME = "handover.sock"
_MAX_PATH = 107  # sun_path holds 108 bytes with its NUL
_BACKLOG = 64


@dataclass
class Bound:
    """A listening socket and the file it is bound to."""

    sock: socket.socket
    path: Path
    ident: tuple[int, int]  # (st_dev, st_ino) of the socket file we made

    def still_ours(self) -> bool:
        """Whether ``path`` is still the socket file we bound (not removed, not replaced)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def close(self) -> None:
        """Stops listening (a blocked ``accept`` returns) and removes the file if still ours."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self.still_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _bind(path: Path, mode: int) -> Bound:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise errors.FailedPrecondition(f"{path} is a directory, not a socket")
        path.unlink()  # a stale socket (unlink never follows a symlink)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Never follows a symlink: one swapped in after bind raises instead of changing its target.
        os.chmod(path, mode, follow_symlinks=False)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise errors.FailedPrecondition(f"{path} was replaced while it was being bound")
        sock.listen(_BACKLOG)
    except (OSError, NotImplementedError) as exc:
        sock.close()
        raise errors.FailedPrecondition(f"cannot listen on {path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return Bound(sock, path, (st.st_dev, st.st_ino))


def bind_node(path: Path) -> Bound:
    """The node socket: the blobstore's user and group only (the nodeagent, host tools)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _bind(path, 0o660)


def bind_instance(instance_dir: Path, instance_id: str) -> Bound:
    """``instance_dir/handover.sock``, connectable by any user (a container's root may be
    mapped to any host uid). ``instance_dir`` must exist, be a real directory (not a symlink)
    and be named after the instance."""
    if not instance_dir.is_absolute() or instance_dir.name != instance_id:
        raise errors.InvalidArgument(f"instance_dir: expected the absolute path of the directory of instance "
                                     f"{instance_id} (named after it), got {str(instance_dir)!r}", field="instance_dir")
    try:
        st = os.lstat(instance_dir)
    except OSError as exc:
        raise errors.FailedPrecondition(f"instance_dir: {instance_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise errors.InvalidArgument(f"instance_dir: {instance_dir} is not a directory (symlinks are refused)",
                                     field="instance_dir")
    path = instance_dir / SOCKET_NAME
    if len(os.fsencode(path)) > _MAX_PATH:
        raise errors.InvalidArgument(f"instance_dir: {path} is longer than a Unix socket path may be "
                                     f"({_MAX_PATH} bytes)", field="instance_dir")
    return _bind(path, 0o666)
