"""Hypothesis against the node's Unix-socket protocols (issue 12, Proof; snapwake.protocols).

Every place a node parses bytes from a Unix socket, fed arbitrary and malformed frames:

- the blobstore's handover sockets (``services.blobstore.handover``), the node socket and an
  instance socket, in a real blobstore: each line gets an ``{"ok": ..., "error": ...}`` answer
  (never an internal error), over-long lines and extra fds close the connection after their
  answer, nothing hangs, no thread dies, nothing is logged as a crash, and the sockets still
  serve a real store and load afterwards;
- their clients, against a peer that answers anything: the model server's ``load`` and
  ``store`` (``modelserver.handover``) and the nodeagent's control and handover requests
  (``services.nodeagent.probe``) raise the service's own errors, nothing else;
- the model server's control socket (``modelserver.control``) with a real, unloaded instance:
  every line is answered, and the server lives on.

Valid messages round-trip: any JSON object sent is the object read, however the stream is cut,
and an arena stored through the real client loads back byte for byte. (The nodeagent's
forwarder parses nothing: it splices bytes between two sockets.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzzing import fuzz_settings
from hypothesis import example, given
from hypothesis import strategies as st

from modelserver import handover as client
from modelserver.__main__ import load_tokenizer
from modelserver.arena import MemfdArena
from modelserver.control import ControlServer
from modelserver.instance import Instance, Settings
from services.blobstore.handover import grant
from services.blobstore.testing import running_blobstore
from services.nodeagent import probe
from snapwake import errors
from snapwake.protocols import MAX_LINE as MAX_LINE_CONTROL
from snapwake.protocols import MessageReader, ProtocolError, close_fds, seal_memfd, send_message

pytestmark = pytest.mark.timeout(240)

FUNCTION, SID, OTHER_SID = "acme/default/llama", "acme/default/llama@1", "other/default/x@1"
INSTANCE = "i-00000000000a"
MAX_LINE = 4096  # the fuzzed blobstore's handover_max_message_bytes
REPLY_WITHIN = 10.0  # seconds; a request not answered by then is a hang


# --- a real blobstore, in a loop of its own ------------------------------------------------------

class Failures(logging.Handler):
    """Crashes seen anywhere: error logs and exceptions that ended a thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(f"{record.name}: {record.getMessage()}")

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        self.seen.append(f"thread {args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
                         f"{args.exc_value}")


@pytest.fixture(scope="module")
def failures() -> Iterator[Failures]:
    handler, hook = Failures(), threading.excepthook
    logging.getLogger().addHandler(handler)
    threading.excepthook = handler.thread_died
    try:
        yield handler
    finally:
        threading.excepthook = hook
        logging.getLogger().removeHandler(handler)


@dataclass
class Sockets:
    node: str
    instance: str
    reopen: Callable[[], object]  # what the nodeagent does before each restore (the instance's loads rearm)


def _memfd(data: bytes, seal: bool = True) -> int:
    fd = os.memfd_create("arena", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        seal_memfd(fd)
    return fd


def _manifest(sid: str, size: int) -> dict[str, Any]:
    return {"snapshot_id": sid, "arena_bytes": size, "modelserver_config_json": "{}",
            "tensors": [{"name": "w", "dtype": "bf16", "shape": [2], "offset": "0", "nbytes": "4"}]}


@pytest.fixture(scope="module")
def sockets(tmp_path_factory: pytest.TempPathFactory, failures: Failures) -> Iterator[Sockets]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    blobstore = running_blobstore(tmp_path_factory.mktemp("fuzz-blobstore"), handover_max_message_bytes=MAX_LINE,
                                  handover_idle_timeout=5.0, handover_request_timeout=2.0,
                                  handover_mapped_timeout=2.0)
    app = asyncio.run_coroutine_threadsafe(blobstore.__aenter__(), loop).result(30)
    instance_dir = Path(tempfile.mkdtemp(prefix="fz-", dir="/tmp")) / INSTANCE
    instance_dir.mkdir()
    try:
        granted = grant(INSTANCE, FUNCTION, -1)
        path = app.handover.open_instance(granted, instance_dir)
        client.store(app.cfg.handover_socket, SID, _manifest(SID, 4096), -1, _memfd(os.urandom(4096)), 10)
        yield Sockets(app.cfg.handover_socket, str(path), lambda: app.handover.open_instance(granted, instance_dir))
    finally:
        asyncio.run_coroutine_threadsafe(blobstore.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        shutil.rmtree(instance_dir.parent, ignore_errors=True)


# --- frames ------------------------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_SNAPSHOT_ID = st.one_of(st.sampled_from([SID, OTHER_SID, "acme/default/llama@0", "acme/default/llama",
                                          "acme/default/llama@1/../x", ""]), st.text(max_size=30), _JSON)
_GPU = st.one_of(st.sampled_from([-1, 0, 1, -2]), st.integers(), _JSON)
_MANIFEST = st.one_of(
    st.builds(lambda sid, size, chunk: {**_manifest(sid, size), "chunk_bytes": chunk},
              st.sampled_from([SID, "acme/default/llama@2", OTHER_SID]),
              st.sampled_from([0, 1, 4, 4096, 4097, 1 << 40, 2**63 - 1, 2**64, -1]),
              st.sampled_from([0, 1, 4096, 2**63, -1])),
    _JSON)
_TRACEPARENT = st.one_of(st.text(max_size=60), _JSON, st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    """A request that is well-formed but for at most one field: one dropped, or anything instead."""
    op = draw(st.sampled_from(["load", "prepare", "store"]))
    msg: dict[str, Any] = {"op": op, "snapshot_id": draw(st.sampled_from([SID, "acme/default/llama@2", OTHER_SID])),
                           "gpu": draw(st.sampled_from([-1, -1, 0]))}
    if op == "store":
        msg["manifest"] = draw(_MANIFEST)
    change = draw(st.sampled_from(["none", "drop", "replace", "traceparent"]))
    key = draw(st.sampled_from(sorted(msg)))
    if change == "drop":
        del msg[key]
    elif change == "replace":
        msg[key] = draw({"op": st.one_of(st.sampled_from(["mapped", "status", ""]), _JSON),
                         "snapshot_id": _SNAPSHOT_ID, "gpu": _GPU, "manifest": _MANIFEST}[key])
    elif change == "traceparent":
        msg["traceparent"] = draw(_TRACEPARENT)
    return msg


_MESSAGE = _message()


@dataclass(frozen=True)
class Frame:
    line: bytes  # without its newline
    fds: str = "none"  # none | sealed | unsealed | pipe | two
    broken: bool = False  # the server closes the connection after answering


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg).encode()


_RAW = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b""))
_FRAME = st.one_of(
    st.builds(Frame, _MESSAGE.map(_line), st.sampled_from(["none", "none", "sealed", "sealed", "unsealed", "pipe"])),
    st.builds(Frame, _MESSAGE.map(_line)),
    st.builds(Frame, _RAW),
    st.builds(Frame, st.integers(1, 50_000).map(lambda n: b"[" * n)),  # deep, and (past the limit) long
    st.builds(Frame, st.sampled_from([b"{}", b"[]", b'"op"', b"null", b"1e999", b'{"op": NaN}', b"\xff"])),
    st.builds(Frame, _MESSAGE.map(_line), st.just("two"), st.just(True)),
)


def _fds(kind: str) -> list[int]:
    if kind == "none":
        return []
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    fds = [_memfd(b"\0" * 4096, seal=kind != "unsealed")]
    return fds + [_memfd(b"\0" * 16)] if kind == "two" else fds


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_WITHIN)
    sock.connect(path)
    return sock


def _send(sock: socket.socket, frame: Frame) -> None:
    fds = _fds(frame.fds)
    try:
        data = frame.line + b"\n"
        if fds:
            socket.send_fds(sock, [data[:1]], fds)
            data = data[1:]
        sock.sendall(data)
    finally:
        close_fds(fds)


def _assert_answer(reply: dict[str, Any], frame: Frame) -> None:
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        error = reply.get("error")
        assert isinstance(error, str) and error, reply
        assert not error.startswith("internal error"), (frame, error)
        assert len(error) <= 1100, (frame, len(error))


def _converse(path: str, frames: list[Frame]) -> None:
    """Sends each frame and reads its answer; an over-long or many-fd frame ends the connection."""
    with _connect(path) as sock:
        reader = MessageReader(sock)
        try:
            for frame in frames:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    _send(sock, frame)  # a line over the limit is answered (and closed) mid-way
                long = len(frame.line) > MAX_LINE
                reply, fds = reader.read(REPLY_WITHIN, REPLY_WITHIN)
                close_fds(fds)
                _assert_answer(reply, frame)
                if reply.get("ok") and "manifest" in reply:  # a load: the memory is ours, say so
                    send_message(sock, {"op": "mapped"})
                if long or frame.broken:
                    with pytest.raises(ConnectionError):
                        reader.read(REPLY_WITHIN, REPLY_WITHIN)
                    return
        finally:
            reader.close()


def _round_trip(path: str, data: bytes, sid: str = SID) -> None:
    """A real model server client stores ``data`` and loads it back."""
    stored = client.store(path, sid, _manifest(sid, len(data)), -1, _memfd(data), REPLY_WITHIN)
    assert stored["ok"] and stored["bytes"] == len(data)
    loaded: list[bytes] = []

    def mapper(fd: int, reply: dict[str, Any]) -> None:
        with mmap.mmap(fd, reply["bytes"], prot=mmap.PROT_READ) as mem:
            loaded.append(bytes(mem))
        os.close(fd)

    reply = client.load(path, sid, -1, mapper, REPLY_WITHIN)
    assert loaded == [data] and reply["manifest"]["snapshot_id"] == sid


@pytest.mark.parametrize("which", ["node", "instance"])
def test_handover_answers_any_frame_and_lives_on(sockets: Sockets, failures: Failures, which: str) -> None:
    path = getattr(sockets, which)

    @fuzz_settings(150)
    @given(frames=st.lists(_FRAME, min_size=1, max_size=4))
    @example(frames=[Frame(b"[" * 4000)])
    @example(frames=[Frame(_line({"op": "store", "snapshot_id": SID, "gpu": -1, "manifest": _manifest(SID, size)}),
                           "sealed") for size in (4097, 1 << 40, 2**64)])
    @example(frames=[Frame(_line({"op": "load", "snapshot_id": SID, "gpu": gpu})) for gpu in (10**30, -(10**30))])
    def run(frames: list[Frame]) -> None:
        _converse(path, frames)
        assert failures.seen == []

    run()
    sockets.reopen()
    _round_trip(path, os.urandom(4096 + 7))
    assert failures.seen == []


# --- round trips --------------------------------------------------------------------------------

@fuzz_settings(30)
@given(msgs=st.lists(st.dictionaries(st.text(max_size=10), _JSON, max_size=5), min_size=1, max_size=5),
       cut=st.integers(1, 64))
def test_any_json_object_round_trips_however_the_stream_is_cut(msgs: list[dict[str, Any]], cut: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(REPLY_WITHIN)
        data = b"".join(json.dumps(m).encode() + b"\n" for m in msgs)

        def send() -> None:  # from a thread: tiny pieces fill a socket's buffer long before their bytes do
            for i in range(0, len(data), cut):
                a.sendall(data[i:i + cut])

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reader = MessageReader(b, max_bytes=1 << 20)
        assert [reader.read(REPLY_WITHIN, REPLY_WITHIN)[0] for _ in msgs] == msgs
        sender.join(REPLY_WITHIN)


def _prepare(path: str, sid: str) -> None:
    """What the nodeagent does before a restore: have the blobstore fill memory for a later load."""
    with _connect(path) as sock:
        send_message(sock, {"op": "prepare", "snapshot_id": sid, "gpu": -1})
        reader = MessageReader(sock)
        assert reader.read(REPLY_WITHIN, REPLY_WITHIN)[0] == {"ok": True}


@fuzz_settings(20)
@given(size=st.integers(4, 200_000), seed=st.integers(0, 2**32), prepared=st.booleans())
@example(size=4103, seed=0, prepared=True)  # was the memory prepared before the store: the old bytes
def test_a_stored_arena_loads_back_byte_for_byte(sockets: Sockets, failures: Failures, size: int, seed: int,
                                                 prepared: bool) -> None:
    if prepared:  # of the copy the store below replaces
        _prepare(sockets.node, SID)
    sockets.reopen()
    _round_trip(sockets.instance, random.Random(seed).randbytes(size))
    assert failures.seen == []


# --- the clients, against a peer that answers anything -----------------------------------------

_REPLY = st.one_of(
    st.fixed_dictionaries({"ok": st.one_of(st.booleans(), _JSON)},
                          optional={"bytes": _GPU, "alloc_bytes": _GPU, "manifest": _JSON, "error": _JSON,
                                    "phase": _JSON}).map(_line),
    _RAW, st.sampled_from([b"[]", b"5", b'"ok"', b"null", b"[" * 100_000, b""]))


class Peer:
    """A Unix socket whose every connection gets ``reply`` (and ``fds``) after the request line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.path = path

    def answer(self, reply: bytes, fd_kind: str, newline: bool) -> Future[None]:
        done: Future[None] = Future()

        def serve() -> None:
            try:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(REPLY_WITHIN)
                    with contextlib.suppress(OSError):
                        conn.recv(1 << 16)
                        _send(conn, Frame(reply, fd_kind)) if newline else conn.sendall(reply)
                        conn.shutdown(socket.SHUT_WR)
                        conn.recv(1 << 16)  # the client's "mapped", or its close
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                done.set_exception(exc)

        threading.Thread(target=serve, daemon=True).start()
        return done


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(str(tmp_path / "peer.sock"))
    with p.sock:
        yield p


@fuzz_settings(80)
@given(reply=_REPLY, fd_kind=st.sampled_from(["none", "sealed", "unsealed", "pipe", "two"]), newline=st.booleans(),
       gpu=st.sampled_from([-1, 0]))
@example(reply=b"[]", fd_kind="none", newline=True, gpu=-1)
def test_the_model_servers_client_raises_only_its_errors(peer: Peer, reply: bytes, fd_kind: str, newline: bool,
                                                         gpu: int) -> None:
    mapped: list[int] = []

    def mapper(fd: int, got: dict[str, Any]) -> None:
        mapped.append(fd)
        os.close(fd)

    served = peer.answer(reply, fd_kind, newline)
    with contextlib.suppress(errors.Unavailable, errors.StartFailed):
        client.load(peer.path, SID, gpu, mapper, REPLY_WITHIN)
    served.result(REPLY_WITHIN)
    served = peer.answer(reply, fd_kind, newline)
    with contextlib.suppress(errors.Unavailable):
        client.store(peer.path, SID, _manifest(SID, 16), gpu, _memfd(b"\0" * 16), REPLY_WITHIN)
    served.result(REPLY_WITHIN)


@fuzz_settings(60)
@given(reply=_REPLY, newline=st.booleans())
@example(reply=b"[]", newline=True)  # was AttributeError: 'list' object has no attribute 'get'
@example(reply=b"[" * 100_000, newline=True)  # was RecursionError
def test_the_nodeagents_requests_raise_only_unavailable(peer: Peer, reply: bytes, newline: bool) -> None:
    for ask in (probe.control, probe.handover):
        served = peer.answer(reply, "none", newline)
        try:
            got = asyncio.run(ask(peer.path, {"op": "status"}, REPLY_WITHIN))
        except errors.Unavailable as exc:
            assert exc.message
        else:
            assert isinstance(got, dict) and got.get("ok")
        served.result(REPLY_WITHIN)


# --- the model server's control socket ---------------------------------------------------------

@pytest.fixture(scope="module")
def control_path(demo_model_dir: Path) -> Iterator[str]:
    """A real control server over a real instance that has loaded nothing (phase loading)."""
    instance = Instance(Settings(demo_model_dir), MemfdArena(), load_tokenizer(demo_model_dir))
    path = os.path.join(tempfile.mkdtemp(prefix="fz-", dir="/tmp"), "control.sock")
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _, ctx: unhandled.append(str(ctx.get("exception") or ctx["message"])))
    unhandled: list[str] = []
    server = ControlServer(instance, path)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    assert unhandled == []


_CONTROL = st.one_of(
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(["status", "release", "attach", "snapshot"]), _JSON)},
                          optional={"snapshot_id": _SNAPSHOT_ID, "gpu": _GPU,
                                    "traceparent": st.text(max_size=60)}).map(_line),
    _RAW, st.integers(1, 50_000).map(lambda n: b"[" * n))


@fuzz_settings(60)
@given(lines=st.lists(_CONTROL, min_size=1, max_size=3))
@example(lines=[b"[" * 5000])  # was RecursionError: the connection dropped without an answer
@example(lines=[b"x" * (17 << 20)])  # over the line limit: was ValueError out of the handler
def test_the_control_socket_answers_every_line(control_path: str, lines: list[bytes]) -> None:
    with _connect(control_path) as sock:
        reader = MessageReader(sock, max_bytes=1 << 20)
        for line in lines:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line + b"\n")  # a line over the limit is answered (and closed) mid-way
            reply, _ = reader.read(REPLY_WITHIN, REPLY_WITHIN)
            assert isinstance(reply.get("ok", True), bool) and (reply.get("ok", True) or reply["error"]), reply
            if len(line) > MAX_LINE_CONTROL:
                assert "longer than" in reply["error"]
                with pytest.raises(ConnectionError):
                    reader.read(REPLY_WITHIN, REPLY_WITHIN)
                return
        with pytest.raises(ProtocolError):
            reader.read(0.01)  # nothing more was said
