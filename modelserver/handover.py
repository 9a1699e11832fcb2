"""The model server's side of the blobstore handover socket (protocol in ``snapwake.protocols``).

Socket and protocol failures are translated here, once, into ``snapwake.errors``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from snapwake.errors import StartFailed, Unavailable
from snapwake.protocols import recv_message, send_message
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


def load(path: str, snapshot_id: str, gpu: int, mapper: Callable[[int, dict[str, Any]], None],
         timeout: float) -> dict[str, Any]:
    """Asks for ``snapshot_id``; ``mapper(fd, reply)`` maps the memory (and owns the fd); then
    tells the blobstore it may drop its handle. Returns the blobstore's reply."""
    sock = _connect(path, timeout)
    fds: list[int] = []
    try:
        send_message(sock, {"op": "load", "snapshot_id": snapshot_id, "gpu": gpu, **traceparent()})
        reply, fds = recv_message(sock)
        if not reply.get("ok"):
            raise StartFailed(f"blobstore refused load of {snapshot_id}: {reply.get('error', reply)}")
        if len(fds) != 1:
            raise StartFailed(f"blobstore sent {len(fds)} file descriptors for {snapshot_id}, expected 1")
        fd = fds.pop()
        mapper(fd, reply)
        send_message(sock, {"op": "mapped"})
        return reply
    except (OSError, ConnectionError, ValueError) as exc:
        raise Unavailable(f"handover load of {snapshot_id} on {path}: {exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)
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
        send_message(sock, {"op": "store", "snapshot_id": snapshot_id, "manifest": manifest, "gpu": gpu},
                     fds=[fd])
        os.close(fd)
        fd = -1
        reply, extra = recv_message(sock)
        for f in extra:
            os.close(f)
    except (OSError, ConnectionError, ValueError) as exc:
        raise Unavailable(f"handover store of {snapshot_id} on {path}: {exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        sock.close()
    if not reply.get("ok"):
        raise Unavailable(f"blobstore refused store of {snapshot_id}: {reply.get('error', reply)}")
    return reply
