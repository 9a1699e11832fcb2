"""The handover's pure parts: who may ask what (grants), the bounded message reader, memfd seals.

The reader runs over a socketpair; fd counts come from /proc/self/fd.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from services.blobstore.handover import Grant, PermissionDenied, grant
from services.blobstore.handover.grants import authorize
from snapwake import errors
from snapwake.protocols import MessageReader, ProtocolError, ReceivedFds, memfd_problem, seal_memfd

OWN = Grant("i-0123456789ab", "acme/default/llama", -1)
ON_GPU = Grant("i-0123456789ab", "acme/default/llama", 1)


def open_fds() -> int:
    gc.collect()  # sockets of earlier tests that only the collector still holds
    return len(os.listdir("/proc/self/fd"))


def _quietly(send: Callable[[], object]) -> threading.Thread:
    """Runs ``send`` in a thread that ends quietly when the reader hangs up on it."""
    def run() -> None:
        with contextlib.suppress(OSError):
            send()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


# ---- grants ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("who", "op", "sid", "gpu"), [
    (None, "load", "other/x/y@1", 3),                      # the node socket serves everything
    (None, "prepare", "acme/default/llama@2", -1),
    (OWN, "load", "acme/default/llama@7", -1),
    (OWN, "store", "acme/default/llama@1", -1),            # any revision of its function
    (ON_GPU, "load", "acme/default/llama@7", 1),
])
def test_allowed(who: Grant | None, op: str, sid: str, gpu: int) -> None:
    authorize(who, op, sid, gpu)


@pytest.mark.parametrize(("who", "op", "sid", "gpu", "needle"), [
    (OWN, "load", "acme/default/other@7", -1, "snapshot acme/default/other@7 is not of function acme/default/llama"),
    (OWN, "store", "evil/default/llama@7", -1, "snapshot evil/default/llama@7 is not of function"),
    (OWN, "load", "acme/default/llama-2@1", -1, "snapshot acme/default/llama-2@1"),  # a prefix is not a match
    (OWN, "prepare", "acme/default/llama@7", -1, "prepare is not served on instance i-0123456789ab's socket"),
    (OWN, "load", "acme/default/llama@7", 0, "may use host memory (gpu -1) only, not gpu 0"),
    (ON_GPU, "load", "acme/default/llama@7", 0, "may use gpu 1 only, not gpu 0"),
    (ON_GPU, "store", "acme/default/llama@7", -1, "may use gpu 1 only, not host memory"),
])
def test_refused(who: Grant, op: str, sid: str, gpu: int, needle: str) -> None:
    with pytest.raises(PermissionDenied) as caught:
        authorize(who, op, sid, gpu)
    assert caught.value.message.startswith("permission denied: ") and needle in caught.value.message


@pytest.mark.parametrize(("iid", "fid", "gpu", "field"), [
    ("i-0123", "acme/default/llama", -1, "instance_id"),
    ("I-0123456789AB", "acme/default/llama", -1, "instance_id"),
    ("i-0123456789ab", "acme/llama", -1, "function_id"),
    ("i-0123456789ab", "acme/default/Llama", -1, "function_id"),
    ("i-0123456789ab", "acme/default/llama@1", -1, "function_id"),
    ("i-0123456789ab", "acme/default/llama", -2, "gpu_index"),
])
def test_bad_grants_name_the_field(iid: str, fid: str, gpu: int, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        grant(iid, fid, gpu)
    assert caught.value.field == field and caught.value.message.startswith(f"{field}: ")


# ---- the reader ------------------------------------------------------------------------------------

def test_pipelined_messages_keep_their_bytes_and_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r1, w1 = os.pipe()
    os.close(w1)
    socket.send_fds(a, [b"{"], [r1])  # how send_message attaches an fd: to the first byte
    a.sendall(b'"n": 1}\n{"n": 2}\n')
    socket.send_fds(a, [b"{"], [r1])
    a.sendall(b'"n": 3}\n')
    os.close(r1)
    reader = MessageReader(b)
    got = [reader.read(1.0, 1.0) for _ in range(3)]
    assert [(m["n"], len(fds)) for m, fds in got] == [(1, 1), (2, 0), (3, 1)]
    for _, fds in got:
        ReceivedFds(fds).__exit__(None, None, None)


def test_bad_json_is_answered_and_the_stream_goes_on(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b'\xff\x00 not json\n[1, 2]\n' + b"[" * 100_000 + b"\n" + b'{"op": "load"}\n')
    reader = MessageReader(b, max_bytes=1 << 20)
    for needle in ("message: not valid JSON", "message: expected a JSON object, got list", "message: not valid JSON"):
        with pytest.raises(ProtocolError, match=needle) as caught:
            reader.read(1.0, 1.0)
        assert not caught.value.broken
    assert reader.read(1.0, 1.0) == ({"op": "load"}, [])


def test_a_line_over_the_limit_breaks_the_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sender = _quietly(lambda: a.sendall(b"x" * 300_000))
    with pytest.raises(ProtocolError, match="message: longer than 65536 bytes") as caught:
        MessageReader(b, max_bytes=65536).read(2.0, 2.0)
    assert caught.value.broken
    b.close()
    sender.join(5)


@pytest.mark.parametrize("how", ["one sendmsg", "two sendmsgs"])
def test_extra_fds_are_closed_and_refused(pair: tuple[socket.socket, socket.socket], how: str) -> None:
    a, b = pair
    fds = [os.memfd_create("x") for _ in range(5)]
    if how == "one sendmsg":
        socket.send_fds(a, [b'{"op": "store"'], fds)
    else:
        socket.send_fds(a, [b'{"op": '], fds[:1])
        socket.send_fds(a, [b'"store"'], fds[1:2])
    a.sendall(b"}\n")
    for fd in fds:
        os.close(fd)
    before = open_fds()
    with pytest.raises(ProtocolError, match=r"fd: more than 1 file descriptor\(s\) with one message") as caught:
        MessageReader(b).read(1.0, 1.0)
    assert caught.value.broken and open_fds() == before


def test_idle_and_slow_clients_run_out_of_time(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=r"idle: no request within 0.3s"):
        MessageReader(b).read(0.3, 5.0)
    assert 0.25 < time.monotonic() - t0 < 2

    def drip() -> None:  # a byte every 0.1 s: never idle, never done
        for ch in b'{"op": "load", "snapshot_id": "a/b/c@1"}':
            time.sleep(0.1)
            a.send(bytes([ch]))
    dripping = _quietly(drip)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match=r"message: not complete within 0.5s") as caught:
        MessageReader(b).read(5.0, 0.5)
    assert caught.value.broken and time.monotonic() - t0 < 2
    b.close()
    dripping.join(10)


def test_a_peer_that_leaves_mid_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b'{"op": ')
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError, match="mid-message"):
        MessageReader(b).read(1.0, 1.0)


def test_recv_message_keeps_the_old_contract(pair: tuple[socket.socket, socket.socket]) -> None:
    from snapwake.protocols import recv_message, send_message
    a, b = pair
    fd = os.memfd_create("x")
    send_message(a, {"ok": True, "bytes": 3}, fds=[fd])
    os.close(fd)
    msg, fds = recv_message(b)
    assert msg == {"ok": True, "bytes": 3} and len(fds) == 1
    os.close(fds[0])
    a.sendall(json.dumps({"x": 1}).encode()[:-1])
    a.close()
    with pytest.raises(ConnectionError):
        recv_message(b)


# ---- seals -----------------------------------------------------------------------------------------

def _memfd(n: int, seals: int = 0) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, n)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(("seals", "needle"), [
    (0, "lacks the seals F_SEAL_SHRINK and F_SEAL_GROW"),
    (fcntl.F_SEAL_SHRINK, "lacks the seals F_SEAL_GROW;"),
    (fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE, "lacks the seals F_SEAL_SHRINK;"),
])
def test_a_memfd_without_its_seals_is_named(seals: int, needle: str) -> None:
    fd = _memfd(4096, seals)
    try:
        problem = memfd_problem(fd, 4096)
    finally:
        os.close(fd)
    assert problem is not None and problem.startswith("fd: ") and needle in problem


def test_sealed_memfds_pass_and_other_fds_do_not() -> None:
    fd = _memfd(4096)
    seal_memfd(fd)
    assert memfd_problem(fd, 4096) is None
    assert memfd_problem(fd, 8192) == "fd: the memfd holds 4096 bytes, 8192 expected"
    os.close(fd)
    unsealable = os.memfd_create("t")  # without MFD_ALLOW_SEALING: F_SEAL_SEAL only
    assert "lacks the seals F_SEAL_SHRINK and F_SEAL_GROW" in (memfd_problem(unsealable) or "")
    os.close(unsealable)
    r, w = os.pipe()
    assert (memfd_problem(r) or "").startswith("fd: not a memfd (F_GET_SEALS: ")
    os.close(r)
    os.close(w)
