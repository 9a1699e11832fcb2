"""The two local Unix-socket protocols of a node. Both are JSON lines, one request, one reply.

Control socket (the model server listens; the nodeagent connects)
    Path inside the container: ``$SNAPWAKE_CONTROL_SOCKET`` (the nodeagent bind-mounts the
    instance directory there). Requests:
      {"op": "status"}
          -> {"ok": true, "phase": "loading|serving|released", "arena_bytes": N, "pid": P}
      {"op": "release"}
          Unmap the weights and free the KV memory; keep the virtual range reserved.
          -> {"ok": true, "seconds": s}
      {"op": "attach", "snapshot_id": "t/n/f@1", "gpu": 0}
          Ask the blobstore (handover socket) for the arena, map it at the reserved address,
          rebind tensors, rebuild the KV pool. -> {"ok": true, "bytes": N, "seconds": s,
          "dma_seconds": s}
      {"op": "snapshot", "snapshot_id": "t/n/f@1"}
          Hand the arena and its manifest to the blobstore (handover ``store``).
          -> {"ok": true, "bytes": N, "manifest_digest": "...", "seconds": s}
    A failure is {"ok": false, "error": "message that names the problem"}.

Handover socket (the blobstore listens; model servers connect)
    Two kinds of socket serve the same requests (``services.blobstore.handover``):
      * the node socket, ``--handover-socket`` of the blobstore and the nodeagent: the
        nodeagent's ``prepare`` and host tools; mode 0660, never bound into a container;
      * one socket per instance, ``{instance dir}/handover.sock``, opened for the nodeagent by
        ``BlobstoreService.OpenInstanceHandover`` before the container starts and closed when it
        ends. The model server finds it at ``$SNAPWAKE_HANDOVER_SOCKET``. It serves ``load``
        and ``store`` of that instance's function's snapshots on its GPU only; anything else
        is refused ({"ok": false, "error": "permission denied: ..."}) and logged.
      {"op": "load", "snapshot_id": ..., "gpu": 0 | -1}
          The blobstore fills exportable memory from its cache (device memory through
          ``cuMemCreate`` with a POSIX fd handle when gpu >= 0, a ``memfd`` when gpu = -1),
          then replies with one file descriptor attached (SCM_RIGHTS):
          -> {"ok": true, "bytes": N, "alloc_bytes": A, "manifest": {...}, "dma_seconds": s}
          The client answers {"op": "mapped"} once it has imported and mapped the memory;
          only then does the blobstore drop its own handle.
      {"op": "prepare", "snapshot_id": ..., "gpu": 0 | -1, "manifest_digest": "..."}
          Start filling the memory now (the DMA overlaps the driver restore of the
          container); reply {"ok": true} at once. ``manifest_digest`` (optional, the snapshot
          record's) is checked against the local copy first, as a pre-warm's is. A later ``load`` for the same snapshot and
          gpu takes the prepared memory instead of allocating again. Node socket only.
      {"op": "store", "snapshot_id": ..., "manifest": {...}, "gpu": 0 | -1}
          Sent with the arena's file descriptor attached. The blobstore reads it (imports
          the device memory and copies it to host, or mmaps the memfd), checksums it per
          chunk, writes it striped and caches it. -> {"ok": true, "bytes": N,
          "manifest_digest": "..."}
    The manifest JSON is ``blobstore_pb2.Manifest`` in JSON form (field names as in proto).

    Memfds (gpu = -1) cross the socket sealed: ``F_GET_SEALS`` must include ``F_SEAL_SHRINK``
    and ``F_SEAL_GROW`` (``seal_memfd``), so the receiver's mapping can never lose its pages
    (a shrunk memfd is a SIGBUS in the reader). Both sides check (``memfd_problem``) before they
    map, and refuse a memfd without them, naming the missing seals.

    Limits (the blobstore's ``handover_*`` settings): connections at once, in all and per
    instance socket (one over is answered with an error and closed); the bytes of one line;
    the wait for a request's first byte (idle), then for the whole line; the wait for
    ``mapped``. One message carries at most one file descriptor (``store``: exactly one;
    others: none); more are closed and refused. A line that is not JSON, not an object, or
    over the limit is answered {"ok": false, "error": "message: ..."}; after a line over the
    limit, too many fds or a timeout the connection is closed too.

Trace context (both sockets)
    Any request may carry an optional ``"traceparent": "00-<trace id>-<span id>-<flags>"``
    (W3C Trace Context). The receiver starts its span for the request as a child of it, so one
    trace runs gateway -> scheduler -> nodeagent -> blobstore/modelserver. The nodeagent sends it in
    ``prepare`` (handover) and ``attach`` (control); the model server in ``load``. A missing or
    malformed value only means the receiver's span starts a trace of its own. Senders add
    ``snapwake.telemetry.traceparent()``; receivers continue ``telemetry.parent_context(msg)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

__all__ = ["MAX_FDS", "MAX_LINE", "REQUIRED_SEALS", "MessageReader", "ProtocolError", "ReceivedFds",
           "close_fds", "memfd_problem", "recv_message", "request", "seal_memfd", "send_message"]

MAX_LINE = 16 << 20
MAX_FDS = 1  # no message of either protocol carries more than one file descriptor
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_SEAL_NAMES = ((fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"), (fcntl.F_SEAL_GROW, "F_SEAL_GROW"))


class ProtocolError(ValueError):
    """A message that breaks the protocol, worded for the peer. ``broken``: the stream cannot be
    read on (a line over the limit, too many fds, a timeout), so the connection should close."""

    def __init__(self, message: str, *, broken: bool = False) -> None:
        super().__init__(message)
        self.message, self.broken = message, broken


def send_message(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Sends one JSON line, with file descriptors attached if given (blocking socket)."""
    data = json.dumps(msg).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data[:1]], fds)
        sock.sendall(data[1:])
    else:
        sock.sendall(data)


def close_fds(fds: Iterable[int]) -> None:
    """Closes every fd in ``fds``, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ReceivedFds:
    """The fds that came with one message: whatever is not ``take``n is closed on leaving."""

    def __init__(self, fds: Iterable[int]) -> None:
        self._fds = list(fds)

    def __len__(self) -> int:
        return len(self._fds)

    def one(self) -> int:
        """The one fd (still closed on leaving); ProtocolError when there is not exactly one."""
        if len(self._fds) != 1:
            raise ProtocolError(f"fd: expected exactly one file descriptor, got {len(self._fds)}")
        return self._fds[0]

    def take(self) -> int:
        """The one fd, now owned by the caller."""
        fd = self.one()
        self._fds.clear()
        return fd

    def __enter__(self) -> ReceivedFds:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        close_fds(self._fds)
        self._fds.clear()


class MessageReader:
    """Reads JSON lines, and the fds sent with them, from one stream socket.

    Bytes after a line are kept for the next one. Fds are given to the message holding the last
    byte of the read that brought them: the kernel ends a read right after the bytes that carry
    fds, and senders attach them to a message's first byte. ``read`` raises ``ProtocolError``
    naming the problem (and closes that message's fds), or ``ConnectionError`` when the peer left.
    """

    def __init__(self, sock: socket.socket, max_bytes: int = MAX_LINE, max_fds: int = MAX_FDS) -> None:
        self.sock, self.max_bytes, self.max_fds = sock, max_bytes, max_fds
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._fds: list[tuple[int, int]] = []  # (stream offset of the byte it came with, fd)

    def read(self, idle_s: float | None = None, within_s: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message. ``idle_s`` bounds the wait for its first byte, ``within_s`` the wait
        for the rest once it began (None: the socket's own timeout)."""
        line, fds = self._line(idle_s, within_s)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError) as exc:
            close_fds(fds)
            raise ProtocolError(f"message: not valid JSON ({exc})") from None
        if not isinstance(msg, dict):
            close_fds(fds)
            raise ProtocolError(f"message: expected a JSON object, got {type(msg).__name__}")
        return msg, fds

    def close(self) -> None:
        """Closes the fds of messages not read yet."""
        close_fds(fd for _, fd in self._fds)
        self._fds.clear()

    def _line(self, idle_s: float | None, within_s: float | None) -> tuple[bytes, list[int]]:
        first = None if idle_s is None else time.monotonic() + idle_s
        whole: float | None = None  # set once the line's first byte is here
        scanned = 0  # _buf[:scanned] holds no newline
        while (end := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            if scanned > self.max_bytes:
                raise self._refuse(f"message: longer than {self.max_bytes} bytes")
            if not self._buf:
                self._recv(first, f"idle: no request within {idle_s:g}s" if idle_s else "")
                continue
            if whole is None and within_s is not None:
                whole = time.monotonic() + within_s
            self._recv(whole, f"message: not complete within {within_s:g}s" if within_s else "")
        if end > self.max_bytes:
            raise self._refuse(f"message: longer than {self.max_bytes} bytes")
        last = self._start + end
        fds = [fd for at, fd in self._fds if at <= last]
        self._fds = [(at, fd) for at, fd in self._fds if at > last]
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        self._start = last + 1
        return line, fds

    def _recv(self, deadline: float | None, late: str) -> None:
        """One read into the buffer (its bytes so far hold no newline)."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._refuse(late)
            self.sock.settimeout(left)
        had = len(self._buf)
        want = max(1, min(1 << 16, self.max_bytes + 1 - had))
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, want, max(self.max_fds, 1))
        except TimeoutError:
            if deadline is None:
                raise  # the caller's own socket timeout
            raise self._refuse(late) from None
        self._fds.extend((self._start + had + len(data) - 1, fd) for fd in fds)
        self._buf += data
        end = self._buf.find(b"\n", had)
        upto = self._start + (end if end >= 0 else len(self._buf))
        if flags & socket.MSG_CTRUNC or sum(at <= upto for at, _ in self._fds) > self.max_fds:
            raise self._refuse(f"fd: more than {self.max_fds} file descriptor(s) with one message")
        if not data:
            raise ConnectionError("the peer closed the connection" + (" mid-message" if self._buf else ""))

    def _refuse(self, message: str) -> ProtocolError:
        self.close()
        return ProtocolError(message, broken=True)


def recv_message(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[dict[str, Any], list[int]]:
    """Receives one JSON line and any file descriptors sent with it (blocking socket; bytes
    after the line are dropped, so use ``MessageReader`` to read more than one)."""
    reader = MessageReader(sock, MAX_LINE, max_fds)
    try:
        return reader.read()
    finally:
        reader.close()


def seal_memfd(fd: int) -> None:
    """Seals a memfd (made with ``MFD_ALLOW_SEALING``) against shrinking and growing, as the
    handover requires of every memfd sent."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)


def memfd_problem(fd: int, min_bytes: int = 0) -> str | None:
    """Why ``fd`` may not be mapped as a handed-over memfd (not a memfd, a required seal
    missing, fewer than ``min_bytes``), or None when it may."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        return f"fd: not a memfd (F_GET_SEALS: {exc.strerror})"
    missing = [name for bit, name in _SEAL_NAMES if not seals & bit]
    if missing:
        return f"fd: the memfd lacks the seals {' and '.join(missing)}; seal it before handing it over"
    size = os.fstat(fd).st_size
    if size < min_bytes:
        return f"fd: the memfd holds {size} bytes, {min_bytes} expected"
    return None


def _reply(line: bytes) -> dict[str, Any]:
    """A reply line as a JSON object; ``ProtocolError`` for anything else (deep JSON included)."""
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"reply: not valid JSON ({exc})") from None
    if not isinstance(reply, dict):
        raise ProtocolError(f"reply: expected a JSON object, got {type(reply).__name__}")
    return reply


async def request(path: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request/reply on a Unix socket without fds (the nodeagent's side of control); a reply
    that is not a JSON object is a ``ProtocolError``."""
    async def _go() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        try:
            writer.write(json.dumps(msg).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionError(f"{path} closed without a reply to {msg.get('op')}")
            return _reply(line)
        finally:
            writer.close()
    return await asyncio.wait_for(_go(), timeout)
