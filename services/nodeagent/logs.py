"""An instance's ``output.log``: what its container writes, size-capped, read back safely.

The container's stdout and stderr go to a pipe, not to the file: ``LogRelay`` (one thread per
container, ending when every writer has closed the pipe) copies it into ``output.log`` and,
once that holds ``max_bytes``, renames it to ``output.log.1`` (replacing the older one) and
starts a new file. A container that writes without end costs at most twice ``max_bytes`` of
disk, and it is slowed by the pipe rather than killed.

Both sides open the file relative to its directory (``open_in``): the directory is opened
with ``O_NOFOLLOW`` and must be a directory owned by this process's user and not writable by
others, and the file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular
file. A symlink planted where the log should be (``output.log -> /etc/shadow``), a FIFO, or a
directory swapped for a link is refused (``InvalidArgument`` naming the path), never followed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from snapwake import errors

__all__ = ["DEFAULT_MAX_BYTES", "LogRelay", "container_output", "open_in", "tail"]

log = logging.getLogger(__name__)
DEFAULT_MAX_BYTES = 16 << 20
_READ = 64 << 10


def _why(exc: OSError) -> str:
    # O_NOFOLLOW answers ELOOP for a symlink; O_DIRECTORY answers ENOTDIR for one to a directory.
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "is a symlink or not a directory (symlinks are refused)"
    return exc.strerror or str(exc)


def _open_dir(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidArgument(f"log directory {path}: {_why(exc)}", field="log") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWOTH:
        os.close(fd)
        raise errors.InvalidArgument(f"log directory {path}: must be owned by uid {os.geteuid()} and not writable "
                                     f"by others (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})", field="log")
    return fd


def open_in(path: Path, flags: int, dir_fd: int | None = None) -> int:
    """``path`` opened with ``flags`` without following a symlink at it or at its directory
    (module docstring); a regular file or ``InvalidArgument``."""
    own = dir_fd is None
    parent = _open_dir(path.parent) if dir_fd is None else dir_fd
    try:
        fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=parent)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise errors.InvalidArgument(f"log {path}: {_why(exc)}", field="log") from None
    finally:
        if own:
            os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.InvalidArgument(f"log {path}: not a regular file", field="log")
    os.set_blocking(fd, True)
    return fd


def _read_tail(path: Path, max_bytes: int, dir_fd: int) -> bytes:
    try:
        fd = open_in(path, os.O_RDONLY, dir_fd)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        return f.read(max_bytes)


def tail(path: Path, max_bytes: int = 4096) -> str:
    """The last ``max_bytes`` the container wrote (from ``output.log.1`` too when the current
    file holds less), starting at a line boundary where possible; "" when there is no log."""
    try:
        parent = _open_dir(path.parent)
    except errors.InvalidArgument as exc:
        log.warning("%s", exc.message)
        return ""
    try:
        data = _read_tail(path, max_bytes, parent)
        if len(data) < max_bytes:
            data = _read_tail(path.with_name(path.name + ".1"), max_bytes - len(data), parent) + data
    except errors.InvalidArgument as exc:
        log.warning("not reading %s", exc.message)
        return ""
    finally:
        os.close(parent)
    if len(data) >= max_bytes and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode(errors="replace")


class LogRelay:
    """A pipe for a container's output, copied into ``path`` and rotated at ``max_bytes``
    (module docstring). ``write_fd`` goes to the container; ``start`` once it has it."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        self._dir = _open_dir(path.parent)
        try:
            self._file = open_in(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._dir)
        except BaseException:
            os.close(self._dir)
            raise
        self._size = os.fstat(self._file).st_size
        # Close-on-exec: only the container gets the write end (as its stdout), so the pipe
        # ends when its processes do, not when some later child of this process does.
        self._pipe, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._run, name=f"log-{path.parent.name}", daemon=True)

    def start(self) -> None:
        """Closes this process's write end (the container holds its own) and starts copying."""
        self._close_write()
        self.thread.start()

    def wait(self, timeout: float) -> None:
        """Waits, at most ``timeout``, until the container's output so far is in the file and
        its writers are gone (a failed start: its last words are then readable)."""
        self.thread.join(timeout)

    def _close_write(self) -> None:
        fd, self.write_fd = self.write_fd, -1
        if fd >= 0:
            os.close(fd)

    def _run(self) -> None:
        broken = False
        try:
            # The pipe is drained to its end even when the file cannot be written any more:
            # a container must never block on its own output.
            while chunk := os.read(self._pipe, _READ):
                if not broken:
                    try:
                        self._write(chunk)
                    except (OSError, errors.SnapwakeError) as exc:
                        broken = True
                        log.warning("output of %s is no longer logged: %s", self.path.parent.name, exc)
        except OSError as exc:
            log.warning("output pipe of %s: %s", self.path.parent.name, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Closes the pipe, the file and the directory (the relay's end, or one never started)."""
        self._close_write()
        fds, (self._pipe, self._file, self._dir) = (self._pipe, self._file, self._dir), (-1, -1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._size >= self.max_bytes:
                self._rotate()
            n = os.write(self._file, view[:self.max_bytes - self._size])
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        os.close(self._file)
        self._file = -1
        os.replace(self.path.name, self.path.name + ".1", src_dir_fd=self._dir, dst_dir_fd=self._dir)
        self._file = open_in(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, self._dir)
        self._size = 0


@contextlib.contextmanager
def container_output(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[LogRelay]:
    """A relay into ``path`` whose ``write_fd`` the caller gives a container as its stdout and
    stderr; it starts when the block ends without an error (the container was spawned), and
    is closed, fds and all, when it raises."""
    relay = LogRelay(path, max_bytes)
    try:
        yield relay
    except BaseException:
        relay.close()
        raise
    relay.start()
