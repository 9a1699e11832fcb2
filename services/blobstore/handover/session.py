"""One handover connection: requests one at a time, each bounded, each answered.

Protocol errors (``snapwake.protocols.ProtocolError``: not JSON, too long, too many fds, too
slow) and request errors (the domain tree, ``PermissionDenied`` among them) are turned into
``{"ok": false, "error": ...}`` here, and only here. Every fd received is closed when its
request is done, whatever happened (``ReceivedFds``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.blobstore import manifest as mf
from services.blobstore.core import Blobstore
from services.blobstore.handover.grants import Grant, PermissionDenied, authorize
from services.blobstore.ids import check_snapshot_id
from snapwake import errors, telemetry
from snapwake.protocols import (
    MAX_FDS,
    MessageReader,
    ProtocolError,
    ReceivedFds,
    close_fds,
    memfd_problem,
    send_message,
)

__all__ = ["HandoverLimits", "LoadBudget", "Session"]

log = logging.getLogger(__name__)
OPS = ("load", "prepare", "store")


@dataclass(frozen=True)
class HandoverLimits:
    """Bounds on what clients of the handover sockets can hold."""

    max_connections: int = 64
    """Connections served at once on all handover sockets together; one more is refused."""
    max_connections_per_instance: int = 4
    """Connections served at once on one instance's socket (its model server needs one)."""
    max_message_bytes: int = 8 << 20
    """The longest request line (a manifest of tens of thousands of tensors fits)."""
    idle_timeout: float = 30.0
    """Seconds a connection may wait before it starts its next request."""
    request_timeout: float = 10.0
    """Seconds a request may take to arrive once begun; also bounds sending a reply."""
    mapped_timeout: float = 60.0
    """Seconds exported memory is held for the client's ``mapped`` after a ``load``."""
    max_loads_per_open: int = 2
    """Loads one instance socket serves each time the nodeagent opens it (before the container
    starts and before each restore): a restore needs one, so a hostile instance cannot make the
    blobstore fill exportable memory again and again."""


class LoadBudget:
    """The loads an instance socket may still serve; ``rearm`` when the nodeagent opens it again."""

    def __init__(self, loads: int) -> None:
        self.loads, self._left, self._lock = loads, loads, threading.Lock()

    def rearm(self) -> None:
        with self._lock:
            self._left = self.loads

    def take(self) -> bool:
        """Takes one load; False when none is left."""
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


def _field(msg: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = msg.get(name, default)
    if value is None or not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise errors.InvalidArgument(f"{name}: expected {kind.__name__}, got {value!r}"[:300], field=name)
    return value


def _span(msg: dict[str, Any]) -> AbstractContextManager[trace.Span]:
    """A span for one request, continuing the sender's trace when it sent a ``traceparent``."""
    op = msg.get("op")
    name = f"handover.{op}" if op in OPS else "handover"
    return trace.get_tracer("snapwake").start_as_current_span(name, context=telemetry.parent_context(msg))


def peer(conn: socket.socket) -> str:
    """The connecting process as the kernel saw it at connect time (for log lines)."""
    try:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return "an unknown peer"
    return f"pid {pid} uid {uid}"


class Session:
    """Serves one connection of the node socket (``grant`` None) or of an instance socket."""

    def __init__(self, conn: socket.socket, core: Blobstore, limits: HandoverLimits, grant: Grant | None,
                 on_progress: Callable[[str, int], None] | None = None, budget: LoadBudget | None = None) -> None:
        self.conn, self.core, self.limits, self.grant, self.budget = conn, core, limits, grant, budget
        self.on_progress = on_progress
        self.reader = MessageReader(conn, limits.max_message_bytes, MAX_FDS)
        self.who = f"{'node socket' if grant is None else f'instance {grant.instance_id}'} ({peer(conn)})"

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serves requests until the client leaves, breaks the protocol or ``stopping()``."""
        try:
            while not stopping() and self._one():
                pass
        except OSError as exc:  # ConnectionError among them: the client went away
            log.info("handover client %s went away: %s", self.who, exc)
        finally:
            self.reader.close()

    def _one(self) -> bool:
        """Reads and answers one request; False when the connection should close."""
        try:
            msg, fds = self.reader.read(self.limits.idle_timeout, self.limits.request_timeout)
            with ReceivedFds(fds) as received, _span(msg):
                reply = self._handle(msg, received)
        except ProtocolError as exc:
            log.warning("handover %s: %s", self.who, exc.message)
            self._send({"ok": False, "error": exc.message})
            return not exc.broken
        if reply is not None:
            self._send(reply)
        return True

    def _send(self, reply: dict[str, Any], fds: list[int] | None = None) -> None:
        self.conn.settimeout(self.limits.request_timeout)
        send_message(self.conn, reply, fds)

    def _handle(self, msg: dict[str, Any], received: ReceivedFds) -> dict[str, Any] | None:
        """The reply to one request (None: ``load`` sent its own)."""
        op, sid = str(msg.get("op"))[:40], str(msg.get("snapshot_id"))[:200]  # as logged until checked
        try:
            if msg.get("op") not in OPS:
                raise errors.InvalidArgument(f"op: unknown op {msg.get('op')!r} ({', '.join(OPS)})"[:300], field="op")
            sid = check_snapshot_id(_field(msg, "snapshot_id", str))
            gpu = _field(msg, "gpu", int, -1)
            authorize(self.grant, op, sid, gpu)
            if op == "store":
                return self._store(sid, gpu, msg, received)
            if len(received):
                raise errors.InvalidArgument(f"fd: {op} takes no file descriptor, got {len(received)}", field="fd")
            if op == "load":
                if self.budget is not None and not self.budget.take():
                    raise errors.ResourceExhausted(
                        f"load {sid}: this instance socket already served its {self.budget.loads} load(s) "
                        "for this start or restore")
                self._load(sid, gpu)
                return None
            self.core.prepare(sid, gpu, _field(msg, "manifest_digest", str, ""))
            return {"ok": True}
        except ProtocolError:
            raise
        except PermissionDenied as exc:
            log.warning("handover refused %s %s to %s: %s", op, sid, self.who, exc.message)
            return {"ok": False, "error": exc.message}
        except errors.SnapwakeError as exc:
            said = exc.message if len(exc.message) <= 1000 else exc.message[:1000] + "..."  # echoes of garbage
            log.warning("handover %s %s from %s failed: %s", op, sid, self.who, said)
            return {"ok": False, "error": said}
        except (ConnectionError, TimeoutError):
            raise  # the client, not the request: ``run`` ends the connection
        except Exception as exc:  # noqa: BLE001 - the boundary: the client gets an answer, we keep running
            log.exception("handover %s %s from %s crashed", op, sid, self.who)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _load(self, sid: str, gpu: int) -> None:
        exported = self.core.load(sid, gpu)
        try:
            reply = {"ok": True, "bytes": exported.nbytes, "alloc_bytes": exported.alloc_bytes,
                     "manifest": mf.to_dict(self.core.stat(sid).manifest), "dma_seconds": exported.dma_seconds}
            self._send(reply, fds=[exported.fd])
            try:
                ack, extra = self.reader.read(self.limits.mapped_timeout, self.limits.request_timeout)
            except ProtocolError as exc:
                raise ProtocolError(f"load {sid}: no 'mapped' ({exc.message})", broken=True) from None
            close_fds(extra)
            if extra or ack.get("op") != "mapped":
                log.warning("handover load %s by %s: expected 'mapped' and no fd, got %r with %d fd(s)",
                            sid, self.who, str(ack.get("op"))[:40], len(extra))
        finally:
            exported.release()  # the client holds its own reference once it imported the fd
        log.info("handed over %s on gpu %d to %s: %d bytes, dma %.3fs", sid, gpu, self.who, exported.nbytes,
                 exported.dma_seconds)

    def _store(self, sid: str, gpu: int, msg: dict[str, Any], received: ReceivedFds) -> dict[str, Any]:
        if len(received) != 1:
            raise errors.InvalidArgument(f"fd: store needs exactly one file descriptor, got {len(received)}",
                                         field="fd")
        fd = received.one()
        # Checked here too, before the core drops the cached copy it is about to replace.
        if gpu < 0 and (problem := memfd_problem(fd)) is not None:
            raise errors.InvalidArgument(problem, field="fd")
        progress = None
        if self.on_progress is not None:
            report = self.on_progress
            progress = lambda n: report(sid, n)  # noqa: E731
        m, digest = self.core.store_arena(sid, msg.get("manifest"), fd, gpu, progress)
        return {"ok": True, "bytes": m.arena_bytes, "manifest_digest": digest}
