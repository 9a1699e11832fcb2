"""The handover server: the node socket, the instance sockets, and the connections they admit.

One thread per listening socket blocks in ``accept`` (``Bound.close`` wakes it); one thread per
admitted connection runs a ``Session``. Connections over ``max_connections`` (all sockets) or
``max_connections_per_instance`` (one instance socket) are answered with an error and closed
at once, so a flood from one container neither queues up nor crowds out the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.blobstore.core import Blobstore
from services.blobstore.handover.grants import Grant
from services.blobstore.handover.session import HandoverLimits, LoadBudget, Session, peer
from services.blobstore.handover.sockets import Bound, bind_instance, bind_node

__all__ = ["HandoverServer"]

log = logging.getLogger(__name__)
_LOG_EVERY = 5.0  # seconds between warnings about refused connections on one socket


@dataclass(eq=False)
class _Listener:
    """One listening socket, what it grants (None: the node socket) and its live connections."""

    bound: Bound
    grant: Grant | None
    instance_dir: Path | None = None
    budget: LoadBudget | None = None  # an instance socket's loads until it is opened again
    conns: set[socket.socket] = field(default_factory=set)
    closed: bool = False
    refused: int = 0
    refused_logged_at: float = float("-inf")

    @property
    def name(self) -> str:
        return "the node socket" if self.grant is None else f"instance {self.grant.instance_id}'s socket"


class HandoverServer:
    """Serves ``path`` (the node socket) and the instance sockets opened with ``open_instance``;
    ``on_progress(snapshot_id, bytes_written)`` reports store progress."""

    def __init__(self, path: Path, core: Blobstore, limits: HandoverLimits | None = None,
                 on_progress: Callable[[str, int], None] | None = None) -> None:
        self.path, self.core, self.limits = Path(path), core, limits or HandoverLimits()
        self.on_progress = on_progress
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # the listeners and connection counts
        self._opening = threading.Lock()  # one open or close of an instance socket at a time
        self._node: _Listener | None = None
        self._instances: dict[str, _Listener] = {}
        self._active = 0

    # -- life -------------------------------------------------------------------------------
    def start(self) -> None:
        self._node = self._listen(bind_node(self.path), None)
        log.info("handover node socket on %s", self.path)

    def stop(self) -> None:
        """Closes every socket (instance socket files are removed; the nodeagent reopens them)
        and ends every connection."""
        self.stopping.set()
        with self._lock:
            listeners = [*self._instances.values(), *([self._node] if self._node else [])]
            self._instances.clear()
        for listener in listeners:
            self._close(listener)

    # -- instance sockets ---------------------------------------------------------------------
    def open_instance(self, grant: Grant, instance_dir: Path) -> Path:
        """Opens (or keeps, when open as asked and its file is in place) the socket of
        ``grant.instance_id`` in ``instance_dir``; returns its path."""
        with self._opening:
            self.sweep()
            with self._lock:
                old = self._instances.get(grant.instance_id)
            if old is not None and old.grant == grant and old.instance_dir == instance_dir and old.bound.still_ours():
                if old.budget is not None:
                    old.budget.rearm()  # a restore: its model server loads again
                return old.bound.path
            if old is not None:
                self._drop(grant.instance_id)
            listener = self._listen(bind_instance(instance_dir, grant.instance_id), grant, instance_dir)
            with self._lock:
                self._instances[grant.instance_id] = listener
        log.info("opened the handover socket of instance %s (function %s, gpu %d) at %s",
                 grant.instance_id, grant.function_id, grant.gpu, listener.bound.path)
        return listener.bound.path

    def close_instance(self, instance_id: str) -> bool:
        """Closes the instance's socket and its connections; False when none was open."""
        with self._opening:
            return self._drop(instance_id)

    def sweep(self) -> None:
        """Closes instance sockets whose file is gone or replaced (the nodeagent removed the
        instance dir without closing, e.g. after a crash)."""
        with self._lock:
            gone = [iid for iid, lst in self._instances.items() if not lst.bound.still_ours()]
        for iid in gone:
            log.info("the handover socket file of instance %s is gone; closing it", iid)
            self._drop(iid)

    def active_connections(self) -> int:
        """Connections being served now, on all sockets."""
        with self._lock:
            return self._active

    def instance_sockets(self) -> dict[str, Path]:
        """The open instance sockets by instance id."""
        with self._lock:
            return {iid: lst.bound.path for iid, lst in self._instances.items()}

    def _drop(self, instance_id: str) -> bool:
        with self._lock:
            listener = self._instances.pop(instance_id, None)
        if listener is None:
            return False
        self._close(listener)
        log.info("closed the handover socket of instance %s", instance_id)
        return True

    # -- listening and admitting -----------------------------------------------------------------
    def _listen(self, bound: Bound, grant: Grant | None, instance_dir: Path | None = None) -> _Listener:
        listener = _Listener(bound, grant, instance_dir,
                             None if grant is None else LoadBudget(self.limits.max_loads_per_open))
        name = "handover-accept" if grant is None else f"handover-accept-{grant.instance_id}"
        threading.Thread(target=self._accept, args=(listener,), name=name, daemon=True).start()
        return listener

    def _close(self, listener: _Listener) -> None:
        with self._lock:
            listener.closed = True
            conns = list(listener.conns)
        listener.bound.close()
        for conn in conns:  # wakes their sessions, which close them
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept(self, listener: _Listener) -> None:
        while True:
            try:
                conn, _ = listener.bound.sock.accept()
            except OSError as exc:
                if listener.closed or self.stopping.is_set():
                    return
                log.warning("handover accept on %s: %s", listener.name, exc)  # EMFILE and the like
                time.sleep(0.05)
                continue
            refusal = self._admit(listener, conn)
            if refusal is not None:
                self._note_refusal(listener, conn)
                _refuse(conn, refusal)
                continue
            threading.Thread(target=self._serve, args=(listener, conn), daemon=True,
                             name=f"handover-{listener.grant.instance_id if listener.grant else 'node'}").start()

    def _admit(self, listener: _Listener, conn: socket.socket) -> str | None:
        """Takes a connection slot for ``conn``, or says why there is none."""
        limits = self.limits
        with self._lock:
            if listener.closed or self.stopping.is_set():
                return "handover: the socket is closing"
            if self._active >= limits.max_connections:
                return f"handover: too many connections ({limits.max_connections} at once on this blobstore)"
            if listener.grant is not None and len(listener.conns) >= limits.max_connections_per_instance:
                return (f"handover: too many connections on {listener.name} "
                        f"({limits.max_connections_per_instance} at once)")
            self._active += 1
            listener.conns.add(conn)
        return None

    def _note_refusal(self, listener: _Listener, conn: socket.socket) -> None:
        listener.refused += 1
        now = time.monotonic()
        if now - listener.refused_logged_at >= _LOG_EVERY:
            log.warning("handover: refused %d connection(s) on %s over the limit (last from %s)",
                        listener.refused, listener.name, peer(conn))
            listener.refused, listener.refused_logged_at = 0, now

    def _serve(self, listener: _Listener, conn: socket.socket) -> None:
        try:
            Session(conn, self.core, self.limits, listener.grant, self.on_progress, listener.budget).run(
                lambda: self.stopping.is_set() or listener.closed)
        finally:
            with self._lock:
                self._active -= 1
                listener.conns.discard(conn)
            conn.close()


def _refuse(conn: socket.socket, message: str) -> None:
    """Answers a connection that got no slot and closes it, never waiting on it."""
    with conn:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"ok": False, "error": message}).encode() + b"\n")
