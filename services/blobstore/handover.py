"""The handover socket: model servers ask for an arena (``load``/``prepare``) or give one (``store``).

The protocol is in ``snapwake.protocols``. One thread per connection, so a slow DMA for one
container never blocks another; the work itself runs in ``Blobstore``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from opentelemetry import trace

from services.blobstore import manifest as mf
from services.blobstore.core import Blobstore
from snapwake import errors, telemetry
from snapwake.protocols import recv_message, send_message

__all__ = ["HandoverServer"]

log = logging.getLogger(__name__)


def _field(msg: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = msg.get(name, default)
    if value is None or not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise errors.InvalidArgument(f"{name}: expected {kind.__name__}, got {value!r}", field=name)
    return value


def _span(msg: dict[str, Any]) -> AbstractContextManager[trace.Span]:
    """A span for one request, continuing the sender's trace when it sent a ``traceparent``."""
    op = msg.get("op")
    context = telemetry.parent_context(msg)
    name = f"handover.{op}" if op in ("load", "prepare", "store") else "handover"
    return trace.get_tracer("snapwake").start_as_current_span(name, context=context)


class HandoverServer:
    """Listens on ``path``; ``on_progress(snapshot_id, bytes_written)`` reports store progress."""

    def __init__(self, path: Path, core: Blobstore, mapped_timeout: float = 60.0,
                 on_progress: Callable[[str, int], None] | None = None) -> None:
        self.path, self.core, self.mapped_timeout = Path(path), core, mapped_timeout
        self.on_progress = on_progress
        self.sock: socket.socket | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # containers may run as another user
        self.sock.listen(64)
        self.sock.settimeout(0.2)  # lets the accept loop notice stop()
        self.thread = threading.Thread(target=self._accept, name="handover-accept", daemon=True)
        self.thread.start()
        log.info("handover socket on %s", self.path)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        assert self.sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), name="handover-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self.stopping.is_set():
                try:
                    msg, fds = recv_message(conn)
                except (ConnectionError, OSError, ValueError):
                    return
                try:
                    with _span(msg):
                        self._handle(conn, msg, fds)
                except (ConnectionError, OSError) as exc:
                    log.warning("handover client went away during %s: %s", msg.get("op"), exc)
                    return
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)

    def _handle(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        try:
            sid = _field(msg, "snapshot_id", str)
            gpu = _field(msg, "gpu", int, -1)
            if op == "load":
                return self._load(conn, sid, gpu)
            if op == "prepare":
                self.core.prepare(sid, gpu)
                reply: dict[str, Any] = {"ok": True}
            elif op == "store":
                reply = self._store(sid, gpu, msg, fds)
            else:
                raise errors.InvalidArgument(f"op: unknown op {op!r} (load, prepare, store)", field="op")
        except errors.SnapwakeError as exc:
            log.warning("handover %s %s failed: %s", op, msg.get("snapshot_id"), exc.message)
            reply = {"ok": False, "error": exc.message}
        except Exception as exc:  # noqa: BLE001 - the boundary: the client gets an answer, we keep running
            log.exception("handover %s %s crashed", op, msg.get("snapshot_id"))
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        send_message(conn, reply)

    def _load(self, conn: socket.socket, sid: str, gpu: int) -> None:
        exported = self.core.load(sid, gpu)
        try:
            reply = {"ok": True, "bytes": exported.nbytes, "alloc_bytes": exported.alloc_bytes,
                     "manifest": mf.to_dict(self.core.stat(sid).manifest), "dma_seconds": exported.dma_seconds}
            send_message(conn, reply, fds=[exported.fd])
            conn.settimeout(self.mapped_timeout)
            try:
                ack, extra = recv_message(conn)
            finally:
                conn.settimeout(None)
            for fd in extra:
                os.close(fd)
            if ack.get("op") != "mapped":
                log.warning("handover load %s: expected 'mapped', got %r", sid, ack.get("op"))
        finally:
            exported.release()  # the client holds its own reference once it imported the fd
        log.info("handed over %s on gpu %d: %d bytes, dma %.3fs", sid, gpu, exported.nbytes, exported.dma_seconds)

    def _store(self, sid: str, gpu: int, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            raise errors.InvalidArgument(f"fd: store needs exactly one file descriptor, got {len(fds)}", field="fd")
        progress = None
        if self.on_progress is not None:
            report = self.on_progress
            progress = lambda n: report(sid, n)  # noqa: E731
        m, digest = self.core.store_arena(sid, msg.get("manifest"), fds[0], gpu, progress)
        return {"ok": True, "bytes": m.arena_bytes, "manifest_digest": digest}
