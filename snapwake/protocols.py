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
    Path: ``$SNAPWAKE_HANDOVER_SOCKET`` (bind-mounted into each container).
      {"op": "load", "snapshot_id": ..., "gpu": 0 | -1}
          The blobstore fills exportable memory from its cache (device memory through
          ``cuMemCreate`` with a POSIX fd handle when gpu >= 0, a ``memfd`` when gpu = -1),
          then replies with one file descriptor attached (SCM_RIGHTS):
          -> {"ok": true, "bytes": N, "alloc_bytes": A, "manifest": {...}, "dma_seconds": s}
          The client answers {"op": "mapped"} once it has imported and mapped the memory;
          only then does the blobstore drop its own handle.
      {"op": "prepare", "snapshot_id": ..., "gpu": 0 | -1}
          Start filling the memory now (the DMA overlaps the driver restore of the
          container); reply {"ok": true} at once. A later ``load`` for the same snapshot and
          gpu takes the prepared memory instead of allocating again.
      {"op": "store", "snapshot_id": ..., "manifest": {...}, "gpu": 0 | -1}
          Sent with the arena's file descriptor attached. The blobstore reads it (imports
          the device memory and copies it to host, or mmaps the memfd), checksums it per
          chunk, writes it striped and caches it. -> {"ok": true, "bytes": N,
          "manifest_digest": "..."}
    The manifest JSON is ``blobstore_pb2.Manifest`` in JSON form (field names as in proto).

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
import json
import socket
from typing import Any

__all__ = ["MAX_LINE", "recv_message", "send_message", "request"]

MAX_LINE = 16 << 20


def send_message(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Sends one JSON line, with file descriptors attached if given (blocking socket)."""
    data = json.dumps(msg).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data[:1]], fds)
        sock.sendall(data[1:])
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket, max_fds: int = 1) -> tuple[dict[str, Any], list[int]]:
    """Receives one JSON line and any file descriptors sent with it (blocking socket)."""
    buf = bytearray()
    fds: list[int] = []
    while not buf.endswith(b"\n"):
        data, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, max_fds)
        fds.extend(got)
        if not data:
            raise ConnectionError("peer closed the socket before a full message")
        buf += data
        if len(buf) > MAX_LINE:
            raise ConnectionError("message too long")
    return json.loads(buf), fds


async def request(path: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request/reply on a Unix socket without fds (the nodeagent's side of control)."""
    async def _go() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        try:
            writer.write(json.dumps(msg).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionError(f"{path} closed without a reply to {msg.get('op')}")
            return json.loads(line)
        finally:
            writer.close()
    return await asyncio.wait_for(_go(), timeout)
