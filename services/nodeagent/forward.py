"""How an instance is reached: a host listener per instance that carries each connection into
the container's own network namespace.

Every container has a network namespace with only loopback, so nothing inside can reach the
node, its services or another instance, and nothing outside can reach the container except
through here. The nodeagent listens on the node's instance address (``endpoint_host``, port
chosen by the kernel; that is the instance's ``endpoint`` in etcd) and, per accepted
connection, makes a TCP socket *inside* the container's namespace (``NetNs.socket``: a
dedicated thread ``setns``-es into it, creates the socket and goes back; a socket keeps the
namespace it was made in), connects it to ``127.0.0.1:port`` there and splices bytes both ways
on the event loop. Buffers are bounded (64 KiB reads, writes wait for ``drain``), a connection
that carries nothing either way for ``idle_timeout`` is closed, as is one whose inner connect
does not succeed within ``CONNECT_TIMEOUT`` (the client sees the connection close before any
answer, which httpx reports as a transport error, as it does a refused connect). Bytes go on
as they arrive (asyncio sets TCP_NODELAY), so SSE streams token by token.

A forwarder also says what it carries (``Forwarder.traffic``): its open connections and when
bytes last moved either way. That is how the node tells a user image's RUNNING from its IDLE
(``machine.traffic_inflight``): such a server has no control socket to report requests in
flight. Each splice stamps one float per chunk it moves, nothing per byte.

Why this and not the alternatives: a veth pair per container with a bridge would need firewall
rules to keep etcd, the services and the other instances out, and a mistake in them is silent;
pasta/slirp give the container outbound access (what we must not) and add a process and a
user-space TCP stack per instance. Here nothing is routable from inside by construction, and
the cost is small: ``bench/forward_overhead.py`` on the 2-core dev VM measured a keep-alive
request through the forwarder at about 0.1 ms more than to the same server in the container
without it (p50 0.26 vs 0.15 ms), an SSE event under 10 us more, and a new connection within
the VM's noise (p50 2.8 ms against 2.4 ms on the host's loopback; making the socket in the
namespace is 0.12 ms of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONNECT_TIMEOUT", "Forwarder", "NetNs", "TelemetryRelay", "Traffic"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
_CHUNK = 64 << 10
_MAX_CONNECTIONS = 1024
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


class _NsThread:
    """The one thread that enters other network namespaces; it always goes back to the host's
    before it takes the next job. If it cannot, it is abandoned and a fresh one takes over."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _socket_in(self, ns_fd: int) -> socket.socket:
        """A socket made in the namespace of ``ns_fd`` (a copy this job owns and closes: the
        handle it came from may be closed meanwhile, and its number reused)."""
        try:
            _setns(ns_fd)
        finally:
            os.close(ns_fd)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                _setns(self._home)
            except OSError:
                log.critical("the netns thread cannot return to the host namespace; replacing it")
                self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
                raise

    async def socket_in(self, ns_fd: int) -> socket.socket:
        job = self._pool.submit(self._socket_in, ns_fd)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if job.cancel():  # it never ran: the handle copy is still ours
                os.close(ns_fd)
            else:  # it runs on: close what it makes
                job.add_done_callback(_close_made)
            raise


def _close_made(job: Future[socket.socket]) -> None:
    if job.exception() is None:
        job.result().close()


_thread: _NsThread | None = None


def _ns_thread() -> _NsThread:
    global _thread  # noqa: PLW0603 - one per process, made on first use
    if _thread is None:
        _thread = _NsThread()
    return _thread


class NetNs:
    """A handle on one network namespace (an open ``/proc/PID/ns/net``), kept while in use so
    a reused pid can never redirect us."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def of_pid(cls, pid: int, *, own: bool = True) -> NetNs:
        """The namespace of process ``pid``; with ``own`` it must not be this process's (a
        container that shares the host network, or a pid that died and was reused by a host
        process, is refused with OSError)."""
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if own:
            ours, theirs = os.stat("/proc/self/ns/net"), os.fstat(fd)
            if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
                os.close(fd)
                raise OSError(f"process {pid} is in the host's network namespace")
        return cls(fd)

    async def connect(self, port: int, limit_s: float = CONNECT_TIMEOUT) -> socket.socket:
        """A TCP socket connected to 127.0.0.1:``port`` inside the namespace."""
        if self._fd < 0:
            raise OSError("the network namespace handle is closed")
        sock = await _ns_thread().socket_in(os.dup(self._fd))
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), limit_s)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Traffic:
    """What a forwarder carries at one moment."""

    # Connections carried now, silent keep-alive ones included.
    connections: int
    # time.monotonic() when bytes last moved either way (when the forwarder was made, before any).
    last_moved: float


def _stamp(marks: tuple[list[float], ...]) -> None:
    now = time.monotonic()
    for mark in marks:
        mark[0] = now


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, marks: tuple[list[float], ...]) -> None:
    """Copies until ``src`` ends, then half-closes ``dst``; stamps ``marks`` (monotonic seconds,
    one float each) when a chunk arrives and when it has gone on."""
    while data := await src.read(_CHUNK):
        _stamp(marks)
        dst.write(data)
        await dst.drain()
        _stamp(marks)
    if dst.can_write_eof():
        dst.write_eof()


async def _splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  server: tuple[asyncio.StreamReader, asyncio.StreamWriter], idle_s: float,
                  moved: list[float] | None = None) -> None:
    """Both directions until the server's side ended (an HTTP server that closes is done; a
    client that half-closes still gets its answer), one failed, or nothing moved for ``idle_s``;
    ``moved[0]`` is stamped too whenever bytes move (the owner's view over all its connections)."""
    last = [time.monotonic()]
    marks = (last,) if moved is None else (last, moved)
    up = asyncio.ensure_future(_pump(client[0], server[1], marks))
    down = asyncio.ensure_future(_pump(server[0], client[1], marks))
    pending = {up, down}
    try:
        while down in pending:
            left = last[0] + idle_s - time.monotonic()
            if left <= 0:
                return
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() for t in done):
                return
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _carry(conns: set[asyncio.Task[None]], client: Streams,
                 open_upstream: Callable[[], Awaitable[Streams]], idle_s: float, what: str,
                 moved: list[float] | None = None) -> None:
    """One accepted connection of a Forwarder or TelemetryRelay: counted in ``conns`` (refused
    over the bound), spliced to what ``open_upstream`` dials (stamping ``moved``, see ``_splice``),
    closed on every path."""
    task = asyncio.current_task()
    if task is None or len(conns) >= _MAX_CONNECTIONS:
        await _close(client[1])
        return
    conns.add(task)
    upstream: asyncio.StreamWriter | None = None
    try:
        up_reader, up_writer = await open_upstream()
        upstream = up_writer
        await _splice(client, (up_reader, up_writer), idle_s, moved)
    except (OSError, TimeoutError) as exc:
        log.debug("%s: %s", what, exc)
    except asyncio.CancelledError:
        # ``close`` cancels the connections it drops; asyncio's server callback would log a
        # cancelled handler as an error, and nobody waits on this task but ``close``.
        pass
    finally:
        conns.discard(task)
        await _close(client[1])
        if upstream is not None:
            await _close(upstream)


class Forwarder:
    """One instance's host listener; connections go to ``port`` inside the namespace it is
    ``attach``-ed to (before that, or after ``close``, they are closed at once).

    The listening socket is bound when the forwarder is made (so the endpoint is known before
    the container starts); ``start`` begins accepting. ``traffic`` says what it carries."""

    def __init__(self, host: str, port: int, idle_timeout: float = 600.0) -> None:
        self.target_port, self.idle_timeout = port, idle_timeout
        self._netns: NetNs | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._moved = [time.monotonic()]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, 0))
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.host, self.port = host, int(self._sock.getsockname()[1])

    async def start(self) -> None:
        """Begins accepting connections."""
        if self._sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=self._sock, limit=_CHUNK)
            self._sock = None

    @property
    def endpoint(self) -> str:
        """host:port that clients dial."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def traffic(self) -> Traffic:
        """Its open connections and when bytes last moved through any of them."""
        return Traffic(len(self._conns), self._moved[0])

    def attach(self, netns: NetNs) -> None:
        """From now on, connections go into ``netns`` (which the forwarder then owns)."""
        if self._netns is not None:
            self._netns.close()
        self._netns = netns

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        netns = self._netns
        if netns is None:
            await _close(writer)
            return

        async def inside() -> Streams:
            sock = await netns.connect(self.target_port)
            return await asyncio.open_connection(sock=sock, limit=_CHUNK)

        await _carry(self._conns, (reader, writer), inside, self.idle_timeout, f"forward to port {self.target_port}",
                     self._moved)

    async def close(self) -> None:
        """Stops listening, drops every carried connection and the namespace handle; idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._netns is not None:
            self._netns.close()
            self._netns = None


class TelemetryRelay:
    """The one way out of a container's network namespace: its OTLP exporter dials a Unix
    socket in its instance dir, and each connection is spliced to the node's collector (a TCP
    ``host:port``). Nothing else leaves; a container reaches no other address through it."""

    def __init__(self, path: Path, host: str, port: int, idle_timeout: float = 600.0) -> None:
        self.path, self.host, self.port, self.idle_timeout = path, host, port, idle_timeout
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listens on ``path`` (replacing a stale socket the relay left there)."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=_CHUNK)
        os.chmod(self.path, 0o666)  # the container's user is an unprivileged host id

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def collector() -> Streams:
            return await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=_CHUNK), CONNECT_TIMEOUT)

        await _carry(self._conns, (reader, writer), collector, self.idle_timeout,
                     f"telemetry relay to {self.host}:{self.port}")

    async def close(self) -> None:
        """Stops listening, drops its connections and removes the socket; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

