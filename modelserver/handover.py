"""The model server's side of the blobstore handover socket (protocol in ``snapwake.protocols``).

Socket and protocol failures are translated here, once, into ``snapwake.errors``. Every fd the
blobstore sends is closed on every path unless the mapper took it; a memfd (gpu -1) is mapped
only when it is sealed against shrinking and growing and holds what the reply says.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from snapwake.errors import StartFailed, Unavailable
from snapwake.protocols import ReceivedFds, close_fds, memfd_problem, recv_message, send_message
from snapwake.telemetry import traceparent

__all__ = ["load", "store"]


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise Unavailable(f"handover socket {path}: {exc}") from exc
    return sock


def _checked(fds: ReceivedFds, snapshot_id: str, gpu: int, reply: dict[str, Any]) -> int:
    """The one fd of a ``load`` reply, fit to map; StartFailed naming the problem otherwise."""
    if len(fds) != 1:
        raise StartFailed(f"blobstore sent {len(fds)} file descriptors for {snapshot_id}, expected 1")
    if gpu < 0:
        size = reply.get("alloc_bytes") or reply.get("bytes") or 0
        problem = memfd_problem(fds.one(), size if isinstance(size, int) else 0)
        if problem is not None:
            raise StartFailed(f"blobstore handed over an unusable memfd for {snapshot_id}: {problem}")
    return fds.take()


def load(path: str, snapshot_id: str, gpu: int, mapper: Callable[[int, dict[str, Any]], None],
         timeout: float) -> dict[str, Any]:
    """Asks for ``snapshot_id``; ``mapper(fd, reply)`` maps the memory (and owns the fd); then
    tells the blobstore it may drop its handle. Returns the blobstore's reply."""
    sock = _connect(path, timeout)
    try:
        send_message(sock, {"op": "load", "snapshot_id": snapshot_id, "gpu": gpu, **traceparent()})
        reply, got = recv_message(sock)
        with ReceivedFds(got) as fds:
            if not reply.get("ok"):
                raise StartFailed(f"blobstore refused load of {snapshot_id}: {reply.get('error', reply)}")
            mapper(_checked(fds, snapshot_id, gpu, reply), reply)
        send_message(sock, {"op": "mapped"})
        return reply
    except (OSError, ValueError) as exc:  # ConnectionError and ProtocolError among them
        raise Unavailable(f"handover load of {snapshot_id} on {path}: {exc}") from exc
    finally:
        sock.close()


def store(path: str, snapshot_id: str, manifest: dict[str, Any], gpu: int, fd: int,
          timeout: float) -> dict[str, Any]:
    """Hands the arena (``fd``, closed here) and its manifest to the blobstore; returns its reply."""
    try:
        sock = _connect(path, timeout)
    except Unavailable:
        os.close(fd)
        raise
    try:
        try:
            send_message(sock, {"op": "store", "snapshot_id": snapshot_id, "manifest": manifest, "gpu": gpu},
                         fds=[fd])
        finally:
            os.close(fd)  # a sent message holds its own reference
        reply, extra = recv_message(sock)
        close_fds(extra)
    except (OSError, ValueError) as exc:  # ConnectionError and ProtocolError among them
        raise Unavailable(f"handover store of {snapshot_id} on {path}: {exc}") from exc
    finally:
        sock.close()
    if not reply.get("ok"):
        raise Unavailable(f"blobstore refused store of {snapshot_id}: {reply.get('error', reply)}")
    return reply
