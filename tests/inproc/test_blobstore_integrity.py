"""Snapshot integrity against hostile peers and clients, with real blobstores on free ports:
the manifest digest of the snapshot record is checked before a copy is served or taken from a
peer, declared chunk sizes are capped, and an instance socket serves a bounded number of loads
per start or restore."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.blobstore import manifest as mf
from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.grpcserver import GrpcServer, channel
from snapwake.protocols import recv_message, send_message
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

pytestmark = pytest.mark.timeout(60)

SID = "acme/default/llama@3"
CHUNK = 64 << 10
T = 30.0


def arena(n: int, seed: int = 1) -> bytes:
    return bytes((i * seed * 31 + i // 977) % 256 for i in range(n))


def manifest(data: bytes, chunk: int = CHUNK) -> blobstore_pb2.Manifest:
    return mf.fill_checksums(blobstore_pb2.Manifest(snapshot_id=SID, arena_bytes=len(data)), memoryview(data), chunk)


class HostilePeer(blobstore_pb2_grpc.BlobstoreServiceServicer):
    """Serves whatever manifest and data it was given, whatever digest the request names."""

    def __init__(self, m: blobstore_pb2.Manifest, data: bytes) -> None:
        self.m, self.data = m, data
        self.asked: list[str] = []  # the manifest digest each request named

    async def GetSnapshot(self, request: blobstore_pb2.GetSnapshotRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[blobstore_pb2.GetSnapshotResponse]:
        self.asked.append(request.manifest_digest)
        yield blobstore_pb2.GetSnapshotResponse(manifest=self.m)
        for off in range(0, len(self.data), 1 << 20):
            yield blobstore_pb2.GetSnapshotResponse(data=self.data[off:off + (1 << 20)])


@contextlib.asynccontextmanager
async def hostile(m: blobstore_pb2.Manifest, data: bytes) -> AsyncIterator[tuple[str, HostilePeer]]:
    server = GrpcServer("127.0.0.1:0", [blobstore_pb2.DESCRIPTOR.services_by_name["BlobstoreService"].full_name])
    peer = HostilePeer(m, data)
    blobstore_pb2_grpc.add_BlobstoreServiceServicer_to_server(peer, server.server)
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}", peer
    finally:
        await server.stop(0)


async def prewarm_error(stub: blobstore_pb2_grpc.BlobstoreServiceStub, **request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID, **request), timeout=T)
    return info.value


async def test_a_peer_serving_another_manifest_is_refused_and_logged(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    good, forged = arena(3 * CHUNK + 5, seed=2), arena(3 * CHUNK + 5, seed=8)
    huge = manifest(forged)
    huge.ClearField("chunk_sha256")
    huge.chunk_sha256.append(mf.sha256(forged))  # one chunk of 1 GiB declared: never buffered
    huge.chunk_bytes = 1 << 30
    async with running_blobstore(tmp_path / "a") as a, running_blobstore(tmp_path / "b") as b, \
            hostile(manifest(forged), forged) as (liar, lying), hostile(huge, forged) as (big, _), \
            hostile(manifest(good), good + b"\0" * (2 << 20)) as (long, _), channel(b.address) as ch:
        put = await put_snapshot(a.address, SID, good, CHUNK)
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        with caplog.at_level(logging.WARNING, logger="services.blobstore"):
            err = await prewarm_error(stub, peers=[liar, big, long], manifest_digest=put.manifest_digest)
            warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(
                snapshot_id=SID, peers=[liar, big, long, a.address], manifest_digest=put.manifest_digest), timeout=T)
        assert err.code() == grpc.StatusCode.NOT_FOUND and liar in err.details()
        assert lying.asked == [put.manifest_digest] * 2  # it was told, and lied anyway
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"refused {SID} from peer {liar}: peer {liar} has another manifest of {SID}" in logged
        assert f"refused {SID} from peer {big}: manifest.chunk_bytes: 1073741824 is over the limit" in logged
        assert f"peer {long} could not give {SID}: data: stream of {SID} runs past its" in logged
        assert warm.fetched_from_peer and warm.bytes == len(good)
        got = bytearray()
        async for msg in stub.GetSnapshot(blobstore_pb2.GetSnapshotRequest(snapshot_id=SID), timeout=T):
            got += msg.data
        assert bytes(got) == good


async def test_a_local_copy_with_another_manifest_is_never_served(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    good, stale = arena(2 * CHUNK, seed=3), arena(2 * CHUNK, seed=4)
    async with running_blobstore(tmp_path / "a") as a, running_blobstore(tmp_path / "b") as b, \
            channel(b.address) as ch:
        put = await put_snapshot(a.address, SID, good, CHUNK)
        mine = await put_snapshot(b.address, SID, stale, CHUNK)
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        # Asked for the recorded digest, B refuses to serve its own copy to a peer.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.GetSnapshot(blobstore_pb2.GetSnapshotRequest(
                    snapshot_id=SID, manifest_digest=put.manifest_digest), timeout=T):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{mine.manifest_digest[:12]}, not {put.manifest_digest[:12]}" in info.value.details()
        # Cached under its own digest; the record names A's: the cached and disk copies go, A's comes.
        await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
        with caplog.at_level(logging.ERROR, logger="services.blobstore"):
            warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(
                snapshot_id=SID, peers=[a.address], manifest_digest=put.manifest_digest), timeout=T)
        assert (warm.was_cached, warm.fetched_from_peer) == (False, True)
        assert any("the cached copy has another manifest" in r.getMessage() for r in caplog.records)
        stat = await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
        assert stat.manifest_digest == put.manifest_digest
        # The remembered digest holds for later loads too: a copy put behind its back is not served.
        await put_snapshot(b.address, SID, stale, CHUNK)
        err = await prewarm_error(stub)  # no peer has the recorded one any more (none named)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # dropped, not served


async def test_uploads_declaring_oversized_chunks_or_extra_data_are_refused(tmp_path: Path) -> None:
    data = arena(2 * CHUNK)
    big = manifest(data, chunk=2 * CHUNK)

    async def upload(m: blobstore_pb2.Manifest, payload: bytes) -> grpc.aio.AioRpcError:
        async def messages() -> AsyncIterator[blobstore_pb2.PutSnapshotRequest]:
            yield blobstore_pb2.PutSnapshotRequest(manifest=m)
            for off in range(0, len(payload), 1 << 20):
                yield blobstore_pb2.PutSnapshotRequest(data=payload[off:off + (1 << 20)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutSnapshot(messages(), timeout=T)
        return info.value

    async with running_blobstore(tmp_path, max_chunk_bytes=CHUNK) as app, channel(app.address) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        err = await upload(big, data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"manifest.chunk_bytes: {2 * CHUNK} is over the limit of {CHUNK} bytes" in err.details()
        err = await upload(manifest(data), data + b"x" * (4 << 20))  # would be buffered without end
        # The refusal comes while the client still streams: its next send may fail first, and then
        # gRPC reports that failure ("Internal error from Core") instead of the server's status.
        if err.code() != grpc.StatusCode.INTERNAL or err.details() != "Internal error from Core":
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"data: more than the manifest's {len(data)} bytes" in err.details()
        listing = await stub.ListSnapshots(blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=T)
        assert list(listing.snapshots) == []


def _load(path: Path) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        send_message(sock, {"op": "load", "snapshot_id": SID, "gpu": -1})
        reply, fds = recv_message(sock)
        for fd in fds:
            os.close(fd)
        if reply["ok"]:
            send_message(sock, {"op": "mapped"})
        return reply


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))  # socket paths are limited to 107 bytes
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_an_instance_socket_serves_a_bounded_number_of_loads_per_restore(tmp_path: Path) -> None:
    iid = "i-00000000b0b0"
    with short_dir() as root:
        (root / iid).mkdir()
        async with running_blobstore(tmp_path, handover_max_loads_per_open=2) as app, channel(app.address) as ch:
            await put_snapshot(app.address, SID, arena(CHUNK), CHUNK)
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)

            async def open_socket() -> Path:
                got = await stub.OpenInstanceHandover(blobstore_pb2.OpenInstanceHandoverRequest(
                    instance_id=iid, function_id="acme/default/llama", gpu_index=-1, instance_dir=str(root / iid)),
                    timeout=T)
                return Path(got.socket_path)

            path = await open_socket()
            replies = [await asyncio.to_thread(_load, path) for _ in range(4)]
            assert [r["ok"] for r in replies] == [True, True, False, False]
            assert "already served its 2 load(s) for this start or restore" in replies[2]["error"]
            assert await open_socket() == path  # the nodeagent's next restore opens it again
            assert [(await asyncio.to_thread(_load, path))["ok"] for _ in range(3)] == [True, True, False]
            # The node socket (the nodeagent's) is not bounded this way.
            assert all([(await asyncio.to_thread(_load, Path(app.cfg.handover_socket)))["ok"] for _ in range(3)])


async def test_a_prepare_naming_another_digest_loads_nothing(tmp_path: Path) -> None:
    """The nodeagent's restore names the record's digest in ``prepare``: a local copy with another
    manifest is then never handed to the model server."""
    async with running_blobstore(tmp_path) as app:
        put = await put_snapshot(app.address, SID, arena(CHUNK), CHUNK)
        node = Path(app.cfg.handover_socket)
        bad = await asyncio.to_thread(_ask, node, {"op": "prepare", "snapshot_id": SID, "gpu": -1,
                                                   "manifest_digest": "not-a-digest"})
        assert not bad["ok"] and "manifest_digest: expected 64 lowercase hex digits" in bad["error"]
        other = "0" * 64
        assert (await asyncio.to_thread(_ask, node, {"op": "prepare", "snapshot_id": SID, "gpu": -1,
                                                     "manifest_digest": other}))["ok"]
        refused = await asyncio.to_thread(_load, node)
        assert not refused["ok"] and "not found locally" in refused["error"]
        assert (await asyncio.to_thread(_ask, node, {"op": "prepare", "snapshot_id": SID, "gpu": -1,
                                                     "manifest_digest": put.manifest_digest}))["ok"]
        assert (await asyncio.to_thread(_load, node))["ok"] is False  # the mismatched copy was dropped


def _ask(path: Path, msg: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        send_message(sock, msg)
        reply, fds = recv_message(sock)
        for fd in fds:
            os.close(fd)
        return reply
