"""The handover sockets against strangers: instance sockets serve only their function's
snapshots, memfds must be sealed, every fd is closed, and hostile clients (floods, slowloris,
garbage, oversized lines, extra fds) neither crash the blobstore nor stop a good client.

A real blobstore runs in this process, so /proc/self/fd counts the server's fds too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelserver import handover as client
from modelserver.arena import MemfdArena
from services.blobstore.app import BlobstoreApp
from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.errors import StartFailed
from snapwake.grpcserver import channel
from snapwake.protocols import memfd_problem, recv_message, seal_memfd, send_message
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

pytestmark = pytest.mark.timeout(120)

FUNCTION, SID, FOREIGN = "acme/default/llama", "acme/default/llama@7", "other/default/secret@1"
IID = "i-00000000a0a0"
CHUNK = 64 << 10
REPO = str(Path(__file__).resolve().parents[2])


def arena(n: int, seed: int = 3) -> bytes:
    return bytes((i * seed + i // 4099) % 256 for i in range(n))


def open_fds() -> dict[int, str]:
    """This process's open fds and what each points at."""
    gc.collect()
    got = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            got[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (the listing's own fd, or another thread's)
            pass
    return got


def settled_fds(before: dict[int, str], limit_s: float = 10.0) -> dict[int, str]:
    """The fds opened since ``before`` that are still open once they have all closed (server
    threads close theirs as they end), or after ``limit_s``. Counting alone is not enough: an fd
    of the test's own machinery (a thread, the event loop) may close meanwhile and hide a leak."""
    deadline = time.monotonic() + limit_s
    while (new := {fd: t for fd, t in open_fds().items() if before.get(fd) != t}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


def connect(path: str | Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def ask(path: str | Path, msg: dict[str, Any], fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
    """One request on a fresh connection; the reply and any fds it carried."""
    with connect(path) as sock:
        send_message(sock, msg, fds)
        return recv_message(sock)


def memfd(data: bytes, seals: bool = True) -> int:
    fd = os.memfd_create("arena", os.MFD_ALLOW_SEALING if seals else 0)
    os.write(fd, data)
    if seals:
        seal_memfd(fd)
    return fd


def store(path: str | Path, sid: str, data: bytes, seals: bool = True) -> dict[str, Any]:
    fd = memfd(data, seals)
    try:
        reply, fds = ask(path, {"op": "store", "snapshot_id": sid, "gpu": -1,
                                "manifest": {"snapshot_id": sid, "arena_bytes": len(data)}}, [fd])
    finally:
        os.close(fd)
    assert fds == []
    return reply


def load(path: str | Path, sid: str, gpu: int = -1) -> tuple[dict[str, Any], bytes | None]:
    """A model server's ``load``: the bytes behind the fd, then ``mapped``."""
    with connect(path) as sock:
        send_message(sock, {"op": "load", "snapshot_id": sid, "gpu": gpu})
        reply, fds = recv_message(sock)
        if not reply["ok"]:
            assert fds == [], "a refusal handed out an fd"
            return reply, None
        (fd,) = fds
        assert memfd_problem(fd, reply["bytes"]) is None  # the blobstore seals what it sends
        data = os.pread(fd, reply["bytes"], 0)
        os.close(fd)
        send_message(sock, {"op": "mapped"})
        return reply, data


@dataclass
class Node:
    app: BlobstoreApp
    stub: blobstore_pb2_grpc.BlobstoreServiceStub
    root: Path  # a short /tmp dir holding instance dirs (socket paths are limited to 107 bytes)

    @property
    def node_socket(self) -> str:
        return self.app.cfg.handover_socket

    def instance_dir(self, iid: str = IID) -> Path:
        path = self.root / iid
        path.mkdir(exist_ok=True)
        return path

    async def open(self, iid: str = IID, function_id: str = FUNCTION, gpu: int = -1,
                   instance_dir: Path | None = None) -> Path:
        resp = await self.stub.OpenInstanceHandover(blobstore_pb2.OpenInstanceHandoverRequest(
            instance_id=iid, function_id=function_id, gpu_index=gpu,
            instance_dir=str(instance_dir or self.instance_dir(iid))), timeout=10)
        return Path(resp.socket_path)

    async def close(self, iid: str = IID) -> bool:
        resp = await self.stub.CloseInstanceHandover(
            blobstore_pb2.CloseInstanceHandoverRequest(instance_id=iid), timeout=10)
        return resp.was_open

    async def digest(self, sid: str) -> str:
        stat = await self.stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=sid), timeout=10)
        return stat.manifest_digest


@contextlib.asynccontextmanager
async def node(tmp_path: Path, **settings: Any) -> AsyncIterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    try:
        async with running_blobstore(tmp_path, chunk_bytes=CHUNK, **settings) as app, channel(app.address) as ch:
            yield Node(app, blobstore_pb2_grpc.BlobstoreServiceStub(ch), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- who may load and store what ---------------------------------------------------------------

async def test_an_instance_loads_and_stores_only_its_own_function(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own, secret = arena(2 * CHUNK + 5), arena(CHUNK + 9, seed=7)
    async with node(tmp_path) as n:
        await put_snapshot(n.app.address, SID, own, CHUNK)
        await put_snapshot(n.app.address, FOREIGN, secret, CHUNK)
        secret_digest = await n.digest(FOREIGN)
        path = await n.open()
        assert path == n.root / IID / "handover.sock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 and stat.S_IMODE(os.stat(n.node_socket).st_mode) == 0o660

        assert (await asyncio.to_thread(load, path, SID))[1] == own  # the legitimate load works
        before = open_fds()
        with caplog.at_level(logging.WARNING, logger="services.blobstore.handover"):
            refused, data = await asyncio.to_thread(load, path, FOREIGN)
            stored = await asyncio.to_thread(store, path, FOREIGN, b"\0" * len(secret))
            prepared, _ = await asyncio.to_thread(ask, path, {"op": "prepare", "snapshot_id": SID, "gpu": -1})
            on_gpu, _ = await asyncio.to_thread(load, path, SID, 0)
        assert data is None and not refused["ok"]
        assert refused["error"] == (f"permission denied: snapshot {FOREIGN} is not of function {FUNCTION}, "
                                    f"the only one instance {IID} may load")
        assert not stored["ok"] and f"snapshot {FOREIGN} is not of function {FUNCTION}" in stored["error"]
        assert not prepared["ok"] and "prepare is not served on instance" in prepared["error"]
        assert not on_gpu["ok"] and "may use host memory (gpu -1) only, not gpu 0" in on_gpu["error"]
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(FOREIGN in line and IID in line and "refused load" in line for line in logged), logged
        assert not settled_fds(before)  # the refused store's memfd was closed too
        assert await n.digest(FOREIGN) == secret_digest  # untouched

        mine = arena(CHUNK, seed=5)
        assert (await asyncio.to_thread(store, path, "acme/default/llama@8", mine))["ok"]  # any revision
        assert (await asyncio.to_thread(load, path, "acme/default/llama@8"))[1] == mine
        assert (await asyncio.to_thread(load, n.node_socket, FOREIGN))[1] == secret  # the node socket serves all


def _linked(n: Node) -> str:
    """An instance-named symlink to another directory."""
    (n.root / "ln").mkdir()
    os.symlink(n.instance_dir("i-00000000beef"), n.root / "ln" / IID)
    return str(n.root / "ln" / IID)


@pytest.mark.parametrize(("field", "value", "code", "needle"), [
    ("instance_dir", lambda n: str(n.instance_dir("i-00000000beef")), "INVALID_ARGUMENT",
     "instance_dir: expected the absolute path of the directory of instance"),
    ("instance_dir", lambda n: "relative/" + IID, "INVALID_ARGUMENT", "instance_dir: expected"),
    ("instance_dir", lambda n: str(n.root / "gone" / IID), "FAILED_PRECONDITION", "No such file or directory"),
    ("instance_dir", _linked, "INVALID_ARGUMENT", "is not a directory (symlinks are refused)"),
    ("function_id", lambda n: "acme/llama", "INVALID_ARGUMENT", "function_id: bad function id"),
    ("instance_id", lambda n: "i-1", "INVALID_ARGUMENT", "instance_id: expected i-"),
    ("gpu_index", lambda n: -7, "INVALID_ARGUMENT", "gpu_index: expected -1"),
], ids=["other-dir", "relative", "missing", "symlink", "function", "instance", "gpu"])
async def test_open_requests_are_checked(tmp_path: Path, field: str, value: Callable[[Node], Any], code: str,
                                         needle: str) -> None:
    async with node(tmp_path) as n:
        req = blobstore_pb2.OpenInstanceHandoverRequest(instance_id=IID, function_id=FUNCTION, gpu_index=-1,
                                                        instance_dir=str(n.instance_dir()))
        setattr(req, field, value(n))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await n.stub.OpenInstanceHandover(req, timeout=10)
        assert caught.value.code().name == code and needle in (caught.value.details() or "")
        assert n.app.handover.instance_sockets() == {}


async def test_the_instance_socket_goes_when_closed(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        path = await n.open()
        inode = path.stat().st_ino
        assert await n.open() == path and path.stat().st_ino == inode  # opening again keeps it
        waiting = await asyncio.to_thread(connect, path, 5.0)
        with waiting:
            assert await n.close() is True
            assert not path.exists() and n.app.handover.instance_sockets() == {}
            assert await asyncio.to_thread(waiting.recv, 100) == b""  # its connection was ended too
        with pytest.raises(OSError):
            connect(path)
        assert await n.close() is False

        path = await n.open()  # an instance dir removed without a close (a nodeagent crash) ...
        shutil.rmtree(path.parent)
        other = await n.open("i-00000000b0b0")  # ... is closed by the next open
        assert n.app.handover.instance_sockets() == {"i-00000000b0b0": other}
        await asyncio.to_thread(n.app.handover.stop)  # a stopping blobstore removes its instance sockets
        assert not other.exists() and not Path(n.node_socket).exists()  # noqa: ASYNC240 - a stat in a test


# ---- seals and fds -------------------------------------------------------------------------------

async def test_unsealed_memfds_are_refused_on_store(tmp_path: Path) -> None:
    data = arena(CHUNK + 3)
    async with node(tmp_path) as n:
        await put_snapshot(n.app.address, SID, data, CHUNK)
        await asyncio.to_thread(load, n.node_socket, SID)  # now cached
        digest = await n.digest(SID)
        before = open_fds()
        unsealed = await asyncio.to_thread(store, n.node_socket, SID, b"x" * len(data), False)
        assert not unsealed["ok"] and unsealed["error"] == (
            "fd: the memfd lacks the seals F_SEAL_SHRINK and F_SEAL_GROW; seal it before handing it over")

        half = os.memfd_create("half", os.MFD_ALLOW_SEALING)
        os.write(half, data)
        fcntl.fcntl(half, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        r, w = os.pipe()
        for fd, needle in ((half, "lacks the seals F_SEAL_GROW;"), (r, "fd: not a memfd (F_GET_SEALS: ")):
            reply, _ = await asyncio.to_thread(ask, n.node_socket, {
                "op": "store", "snapshot_id": SID, "gpu": -1, "manifest": {"arena_bytes": len(data)}}, [fd])
            assert not reply["ok"] and needle in reply["error"]
        for fd in (half, r, w):
            os.close(fd)
        assert not settled_fds(before)
        stat = await n.stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=10)
        assert stat.manifest_digest == digest and stat.in_cache  # a refused store evicts nothing
        assert (await asyncio.to_thread(load, n.node_socket, SID))[1] == data


def _one_shot_server(path: str, reply: dict[str, Any], fd: int) -> threading.Thread:
    """A blobstore stand-in answering one ``load`` with ``reply`` and ``fd`` (then closing it)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10)
            recv_message(conn)
            send_message(conn, reply, fds=[fd])
            os.close(fd)
            with contextlib.suppress(OSError, ValueError):
                recv_message(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("seals", [False, True])
def test_the_model_server_maps_only_sealed_memfds(tmp_path: Path, seals: bool) -> None:
    path = str(Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp")) / "h.sock")
    fd = memfd(b"w" * 4096, seals)
    mapped: list[int] = []

    def mapper(got: int, reply: dict[str, Any]) -> None:
        mapped.append(got)
        os.close(got)
    before = open_fds()
    server = _one_shot_server(path, {"ok": True, "bytes": 4096, "alloc_bytes": 4096, "manifest": {}}, fd)
    try:
        if seals:
            assert client.load(path, SID, -1, mapper, 10.0)["ok"] and len(mapped) == 1
        else:
            with pytest.raises(StartFailed) as caught:
                client.load(path, SID, -1, mapper, 10.0)
            assert caught.value.message == (
                f"blobstore handed over an unusable memfd for {SID}: fd: the memfd lacks the seals "
                "F_SEAL_SHRINK and F_SEAL_GROW; seal it before handing it over")
            assert mapped == []
    finally:
        server.join(10)
        shutil.rmtree(Path(path).parent, ignore_errors=True)
    assert len(open_fds()) == len(before) - 1  # ``fd`` went with the server; the received copy is closed


def test_the_model_servers_arena_memfd_is_sealed() -> None:
    arena_ = MemfdArena()
    arena_.allocate(1 << 16)
    fd = arena_.export_fd()
    try:
        assert memfd_problem(fd, 1 << 16) is None
    finally:
        os.close(fd)
        arena_.release()


async def test_fds_are_closed_after_a_burst_of_bad_requests(tmp_path: Path) -> None:
    async with node(tmp_path, handover_max_message_bytes=1 << 16) as n:
        await put_snapshot(n.app.address, SID, arena(CHUNK), CHUNK)
        path = await n.open()
        before = open_fds()

        def burst() -> list[str]:
            errors = []
            for sock_path in (n.node_socket, path):
                for msg, fds, raw in [
                    ({"op": "load", "snapshot_id": SID, "gpu": -1}, 1, None),     # load takes no fd
                    ({"op": "store", "snapshot_id": SID, "gpu": -1, "manifest": {}}, 2, None),  # two fds
                    ({"op": "store", "snapshot_id": FOREIGN, "gpu": -1, "manifest": {}}, 1, None),
                    ({"op": "nope", "snapshot_id": SID}, 1, None),
                    ({"op": "store", "snapshot_id": SID, "gpu": -1, "manifest": {"arena_bytes": 1 << 62}}, 1, None),
                    (None, 1, b"not json\n"),
                    (None, 1, b"x" * 100_000),
                ]:
                    pipes = [os.pipe() for _ in range(fds)]
                    with connect(sock_path) as sock:
                        data = raw if raw is not None else send_bytes(msg)
                        with contextlib.suppress(OSError):
                            socket.send_fds(sock, [data[:1]], [r for r, _ in pipes])
                            sock.sendall(data[1:])
                        for r, w in pipes:
                            os.close(r)
                            os.close(w)
                        with contextlib.suppress(OSError, ValueError):
                            errors.append(recv_message(sock)[0]["error"])
            return errors

        errors = await asyncio.to_thread(burst)
        assert len(errors) == 14 and all(errors), errors
        assert not settled_fds(before)


def send_bytes(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode() + b"\n"


# ---- hostile clients -----------------------------------------------------------------------------

# Idle connections are told so after 3 s: long enough that the floods below are all admitted
# or refused while the first admitted ones still hold their slots, even on a loaded machine.
LIMITS = {"handover_max_connections": 6, "handover_max_connections_per_instance": 2,
          "handover_max_message_bytes": 1 << 16, "handover_idle_timeout": 3.0, "handover_request_timeout": 1.0}
IDLE = b'{"ok": false, "error": "idle: no request within 3s"}\n'


@contextlib.contextmanager
def connections(path: str | Path, count: int) -> Iterator[list[socket.socket]]:
    socks = [connect(path) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the blobstore sends on ``sock`` until it hangs up."""
    sock.settimeout(10)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def _wait_connections(n: Node, want: int) -> None:
    deadline = time.monotonic() + 10
    while n.app.handover.active_connections() != want and time.monotonic() < deadline:
        time.sleep(0.02)
    assert n.app.handover.active_connections() == want


def _floods(n: Node, path: Path, good: Callable[[], None]) -> None:
    with connections(path, 6) as mine:
        _wait_connections(n, 2)  # two admitted; four answered and closed
        good()  # the node socket serves on while the instance's socket is flooded
        _wait_connections(n, 2)
        with connections(n.node_socket, 8) as theirs:
            got = [_until_closed(sock) for sock in mine + theirs]
    # The admitted ones sat idle: each was told so and closed, which freed its slot.
    per_instance = (b'{"ok": false, "error": "handover: too many connections on instance i-00000000a0a0\'s '
                    b'socket (2 at once)"}\n')
    per_node = b'{"ok": false, "error": "handover: too many connections (6 at once on this blobstore)"}\n'
    assert sorted(got[:6]) == sorted([per_instance] * 4 + [IDLE] * 2)
    assert sorted(got[6:]) == sorted([per_node] * 4 + [IDLE] * 4)


def _slowloris(path: Path) -> None:
    with connect(path) as sock:
        for ch in b'{"op": "load", "snapsh':
            try:
                sock.send(bytes([ch]))
            except OSError:  # the blobstore hung up on us: its reply is waiting
                break
            time.sleep(0.1)
        sock.settimeout(5)
        reply, _ = recv_message(sock)
        assert reply == {"ok": False, "error": "message: not complete within 1s"}
        try:
            rest = sock.recv(10)
        except ConnectionResetError:  # it hung up with bytes of ours unread: the end comes as a reset
            rest = b""
        assert rest == b""  # and nothing more was sent


def _garbage_then_good(path: Path, own: bytes) -> None:
    with connect(path) as sock:
        for raw, needle in [
            (b"\xff\xfe\x00garbage\n", "message: not valid JSON"),
            (b"[1, 2, 3]\n", "message: expected a JSON object, got list"),
            (b'{"op": "load", "snapshot_id": 5}\n', "snapshot_id: expected str, got 5"),
            (b'{"op": "load", "snapshot_id": "acme/default/llama@7", "gpu": "0"}\n', "gpu: expected int, got '0'"),
            (b'{"op": "load", "snapshot_id": "acme/default/llama@7", "gpu": true}\n', "gpu: expected int, got True"),
            (b'{"op": ["load"]}\n', "op: unknown op ['load']"),
            (b'{"op": "evict", "snapshot_id": "acme/default/llama@7"}\n', "op: unknown op 'evict'"),
            (b'{"op": "load", "snapshot_id": "' + b"a" * 50_000 + b'"}\n', "snapshot_id: bad snapshot id"),
        ]:
            sock.sendall(raw)
            reply, fds = recv_message(sock)
            assert fds == [] and not reply["ok"] and needle in reply["error"], (raw[:40], reply)
            assert len(reply["error"]) < 1100
        send_message(sock, {"op": "load", "snapshot_id": SID, "gpu": -1})  # the same connection goes on
        reply, (fd,) = recv_message(sock)
        assert reply["ok"] and os.pread(fd, len(own), 0) == own
        os.close(fd)
        send_message(sock, {"op": "mapped"})


def _breakers(path: Path) -> None:
    """Oversized lines, extra fds and half-open connections: an error, then the connection ends."""
    with connect(path) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"{" + b" " * 200_000)
        reply, _ = recv_message(sock)
        assert reply == {"ok": False, "error": "message: longer than 65536 bytes"}
    with connect(path) as sock:
        pipes = [os.pipe() for _ in range(3)]
        socket.send_fds(sock, [b'{"op": "load", "snapshot_id": "acme/default/llama@7"}\n'], [r for r, _ in pipes])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        assert recv_message(sock)[0] == {"ok": False, "error": "fd: more than 1 file descriptor(s) with one message"}
        assert sock.recv(10) == b""
    with connect(path) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""


async def test_hostile_clients_do_not_stop_a_good_one(tmp_path: Path) -> None:
    own = arena(2 * CHUNK + 1, seed=11)
    async with node(tmp_path, **LIMITS) as n:
        await put_snapshot(n.app.address, SID, own, CHUNK)
        path = await n.open()
        before = open_fds()

        def good() -> None:
            assert load(n.node_socket, SID)[1] == own

        await asyncio.to_thread(_floods, n, path, good)
        assert not settled_fds(before)  # every flooding connection is gone, and its slot
        await asyncio.gather(asyncio.to_thread(_slowloris, path), asyncio.to_thread(_garbage_then_good, path, own))
        await asyncio.to_thread(_breakers, path)
        assert not settled_fds(before)
        mine = arena(CHUNK, seed=13)  # and afterwards a well-behaved model server is served
        assert (await asyncio.to_thread(store, path, SID, mine))["ok"]
        assert (await asyncio.to_thread(load, path, SID))[1] == mine


# ---- the nodeagent's side --------------------------------------------------------------------------

async def test_the_nodeagent_gives_each_instance_its_own_socket_until_it_ends(tmp_path: Path) -> None:
    """FakeContainers run the stub model server; the blobstore is real."""
    from services.nodeagent import operations
    from services.nodeagent.agent import NodeAgent
    from services.nodeagent.config import NodeAgentConfig
    from services.nodeagent.containers import FakeContainers
    from services.nodeagent.gpu import NoGpuCheckpointer
    from snapwake.etcd_fake import FakeEtcd
    from tests.unit.test_nodeagent_operations import STUB, start_request  # the stub model server's request

    iid = "i-00000000c0c0"
    async with node(tmp_path) as n:
        await put_snapshot(n.app.address, FOREIGN, arena(CHUNK), CHUNK)
        os.chmod(n.root, 0o711)  # the containers' root dirs are below it (rootfs_dir)
        python = n.root / "py" / "bin" / "python"  # python_dirs binds its parent's parent: not the state
        python.parent.mkdir(parents=True)
        python.write_text(f"#!/bin/sh\nexec \"{sys.executable}\" \"{STUB}\" \"$@\"\n")
        python.chmod(0o755)
        config = NodeAgentConfig(name="node-hs", blobstore=n.app.address, state_dir=str(n.root / "na"),
                                 handover_socket=n.node_socket, containers="fake", python=str(python),
                                 lease_ttl=2, gpus="none", start_timeout=10, reconcile_interval=3600,
                                 model_roots=(str(STUB.parent),), rootfs_dir=str(n.root / "rootfs"))
        agent = NodeAgent(config, FakeEtcd(), FakeContainers(), NoGpuCheckpointer(), [], 1 << 36)
        await agent.start()
        try:
            await operations.start_instance(agent, start_request(iid))
            sock = config.instances_dir / iid / "handover.sock"
            assert n.app.handover.instance_sockets() == {iid: sock} and stat.S_ISSOCK(sock.lstat().st_mode)
            bundle = json.loads((config.instances_dir / iid / "bundle" / "config.json").read_text())
            assert f"SNAPWAKE_HANDOVER_SOCKET={sock}" in bundle["process"]["env"]
            mounted = [m["source"] for m in bundle["mounts"]]
            assert str(Path(n.node_socket).parent) not in mounted and str(sock.parent) in mounted
            refused, _ = await asyncio.to_thread(load, sock, FOREIGN)  # granted function t/d/f only
            assert "permission denied: snapshot other/default/secret@1 is not of function t/d/f" in refused["error"]

            await operations.stop_instance(agent, iid)
            assert n.app.handover.instance_sockets() == {} and not sock.exists()
        finally:
            await agent.stop()


# ---- from inside a real container ------------------------------------------------------------------

HOSTILE = r"""
import hashlib, json, os, socket, sys, time
from snapwake.protocols import recv_message, seal_memfd, send_message

path, own, foreign, node_socket, out = sys.argv[1:6]
result = {"node_socket_visible": os.path.exists(node_socket) or os.path.exists(os.path.dirname(node_socket))}

def conn():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s

def ask(msg, fds=None, raw=None):
    with conn() as s:
        try:
            if raw is None:
                send_message(s, msg, fds)
            else:
                socket.send_fds(s, [raw[:1]], fds or []) if fds else s.sendall(raw[:1])
                s.sendall(raw[1:])
        except OSError:
            pass  # hung up on: the reply is waiting
        return recv_message(s)[0]

def memfd(sealed):
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.write(fd, b"\0" * 4096)
    if sealed:
        seal_memfd(fd)
    return fd

with conn() as s:
    send_message(s, {"op": "load", "snapshot_id": foreign, "gpu": -1})
    reply, fds = recv_message(s)
    result["foreign_load"] = [reply, len(fds)]
store = {"op": "store", "gpu": -1, "manifest": {"arena_bytes": 4096}}
result["foreign_store"] = ask({**store, "snapshot_id": foreign}, [memfd(True)])
result["unsealed_store"] = ask({**store, "snapshot_id": own}, [memfd(False)])
result["prepare"] = ask({"op": "prepare", "snapshot_id": own, "gpu": -1})
result["other_gpu"] = ask({"op": "load", "snapshot_id": own, "gpu": 0})

socks, refused = [conn() for _ in range(50)], 0
for s in socks:
    s.settimeout(0.5)
    try:
        refused += b"too many connections" in s.recv(4096)
    except OSError:
        pass
for s in socks:
    s.close()
result["flood_refused"] = refused
time.sleep(0.5)  # the two admitted ones end on their EOF

result["garbage"] = ask(None, raw=bytes(range(256)).replace(b"\n", b"") * 4 + b"\n")
result["oversized"] = ask(None, raw=b"{" * 300_000)
result["fd_flood"] = ask(None, [os.pipe()[0] for _ in range(200)], raw=b'{"op": "load"}\n')
result["slowloris"] = ask(None, raw=b'{"op": "lo')

with conn() as s:
    send_message(s, {"op": "load", "snapshot_id": own, "gpu": -1})
    reply, fds = recv_message(s)
    result["own"] = [reply["ok"], hashlib.sha256(os.pread(fds[0], reply["bytes"], 0)).hexdigest()]
    send_message(s, {"op": "mapped"})
with open(out, "w") as f:
    json.dump(result, f)
"""


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
async def test_a_hostile_client_in_a_runc_container(tmp_path: Path) -> None:
    import hashlib

    from services.nodeagent.bundle import BundleSpec, IdMap, host_layout, write_bundle
    from services.nodeagent.container import python_dirs
    from services.nodeagent.containers import RuncContainers

    own = arena(2 * CHUNK + 7, seed=17)
    async with node(tmp_path, **LIMITS) as n:
        await put_snapshot(n.app.address, SID, own, CHUNK)
        await put_snapshot(n.app.address, FOREIGN, arena(CHUNK), CHUNK)
        sock = await n.open()
        idir, out = sock.parent, sock.parent / "result.json"
        # The container's root is an unprivileged host user (the sandbox's user namespace): it walks
        # to its root dir and writes its result into the instance dir it is given read-write.
        os.chmod(n.root, 0o711)
        os.chown(idir, IdMap().host(0), IdMap().host(0))
        system, links = host_layout()
        spec = BundleSpec(
            args=(sys.executable, "-c", HOSTILE, str(sock), SID, FOREIGN, n.node_socket, str(out)),
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": REPO}, cwd=str(idir), hostname=IID,
            ro_binds=(*system, *python_dirs(sys.executable), REPO), rw_binds=(str(idir),), symlinks=links)
        bundle = write_bundle(n.root / "bundle", spec)
        runc, cid, log = RuncContainers(n.root / "runc", prefix="hs-"), "hs-hostile", n.root / "hostile.log"
        before = open_fds()
        await runc.run(cid, bundle, log)
        try:
            for _ in range(600):
                state = await runc.state(cid)
                if state is None or not state.alive:
                    break
                await asyncio.sleep(0.1)
        finally:
            await runc.kill(cid)
            await runc.delete(cid)
        assert out.exists(), log.read_text()[-3000:]
        got = json.loads(out.read_text())

        assert got["node_socket_visible"] is False
        reply, fds = got["foreign_load"]
        assert fds == 0 and not reply["ok"] and f"permission denied: snapshot {FOREIGN}" in reply["error"]
        assert f"permission denied: snapshot {FOREIGN}" in got["foreign_store"]["error"]
        assert "lacks the seals F_SEAL_SHRINK and F_SEAL_GROW" in got["unsealed_store"]["error"]
        assert "prepare is not served" in got["prepare"]["error"]
        assert "may use host memory (gpu -1) only, not gpu 0" in got["other_gpu"]["error"]
        assert got["flood_refused"] >= 45
        assert got["garbage"]["error"].startswith("message: not valid JSON")
        assert got["oversized"]["error"] == "message: longer than 65536 bytes"
        assert got["fd_flood"]["error"] == "fd: more than 1 file descriptor(s) with one message"
        assert got["slowloris"]["error"] == "message: not complete within 1s"
        assert got["own"] == [True, hashlib.sha256(own).hexdigest()]

        assert not settled_fds(before)
        assert (await asyncio.to_thread(load, sock, SID))[1] == own  # still serving, from the host too
