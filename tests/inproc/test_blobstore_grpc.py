"""The blobstore's gRPC API against real servers on free ports, with real striped directories."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest

from services.blobstore import manifest as mf
from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.grpcserver import channel
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

SID = "acme/default/llama@3"
CHUNK = 64 << 10
T = 30.0  # every call has a deadline


def arena(n: int, seed: int = 1) -> bytes:
    return bytes((i * seed * 31 + i // 977) % 256 for i in range(n))


async def get_snapshot(stub: blobstore_pb2_grpc.BlobstoreServiceStub, sid: str) -> tuple[blobstore_pb2.Manifest, bytes, int]:
    m, data, msgs = None, bytearray(), 0
    async for msg in stub.GetSnapshot(blobstore_pb2.GetSnapshotRequest(snapshot_id=sid), timeout=T):
        if msg.HasField("manifest"):
            m = msg.manifest
        else:
            assert len(msg.data) <= 1 << 20
            data += msg.data
            msgs += 1
    assert m is not None
    return m, bytes(data), msgs


def corrupt_chunk(root: Path, index: int) -> Path:
    """Flips one byte of chunk ``index`` on disk (two stripes: it lives in d{index % 2})."""
    path = next((root / f"d{index % 2}").glob(f"snapshots/*/*/{index:06d}.chunk"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(raw)
    return path


async def test_put_get_stat_list_delete(tmp_path: Path) -> None:
    data = arena(5 * CHUNK + 1234)
    async with running_blobstore(tmp_path) as app, channel(app.address) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        put = await put_snapshot(app.address, SID, data, CHUNK)
        assert put.bytes_written == len(data)

        m, got, msgs = await get_snapshot(stub, SID)
        assert got == data and m.arena_bytes == len(data) and len(m.chunk_sha256) == 6
        assert msgs >= 6
        stat = await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
        assert (stat.on_disk, stat.in_cache) == (True, False)
        assert stat.manifest_digest == put.manifest_digest == mf.digest(m)

        warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
        assert (warm.was_cached, warm.fetched_from_peer, warm.bytes) == (False, False, len(data))
        again = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
        assert again.was_cached
        listing = await stub.ListSnapshots(blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=T)
        assert [s.manifest.snapshot_id for s in listing.snapshots] == [SID]
        assert listing.snapshots[0].in_cache
        assert listing.cache_bytes_budget == 4 << 20
        assert len(data) <= listing.cache_bytes_used < len(data) + 4096

        await stub.DeleteSnapshot(blobstore_pb2.DeleteSnapshotRequest(snapshot_id=SID), timeout=T)
        listing = await stub.ListSnapshots(blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=T)
        assert list(listing.snapshots) == [] and listing.cache_bytes_used == 0
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("sid", "code", "text"), [
    ("nope", grpc.StatusCode.INVALID_ARGUMENT, "snapshot_id"),
    ("a/b/c@1", grpc.StatusCode.NOT_FOUND, "a/b/c@1"),
])
async def test_bad_and_unknown_ids(tmp_path: Path, sid: str, code: grpc.StatusCode, text: str) -> None:
    async with running_blobstore(tmp_path) as app, channel(app.address) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        for call in (stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=sid), timeout=T),
                     stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=sid), timeout=T),
                     stub.VerifySnapshot(blobstore_pb2.VerifySnapshotRequest(snapshot_id=sid), timeout=T),
                     get_snapshot(stub, sid)):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call
            assert exc.value.code() == code and text in exc.value.details()


async def test_put_rejects_data_that_does_not_match_manifest(tmp_path: Path) -> None:
    data = arena(2 * CHUNK)
    m = mf.fill_checksums(blobstore_pb2.Manifest(snapshot_id=SID, arena_bytes=len(data)), memoryview(data), CHUNK)

    async def messages():  # noqa: ANN202
        yield blobstore_pb2.PutSnapshotRequest(manifest=m)
        yield blobstore_pb2.PutSnapshotRequest(data=data[:CHUNK] + b"x" * CHUNK)

    async with running_blobstore(tmp_path) as app, channel(app.address) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.PutSnapshot(messages(), timeout=T)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk 1" in exc.value.details()
        listing = await stub.ListSnapshots(blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=T)
        assert list(listing.snapshots) == []  # the half-written snapshot never became visible


async def test_corrupt_chunk_is_refused_everywhere(tmp_path: Path) -> None:
    data = arena(4 * CHUNK)
    async with running_blobstore(tmp_path) as app, channel(app.address) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        await put_snapshot(app.address, SID, data, CHUNK)
        corrupt_chunk(tmp_path, 2)

        v = await stub.VerifySnapshot(blobstore_pb2.VerifySnapshotRequest(snapshot_id=SID), timeout=T)
        assert (v.ok, v.bad_chunk) == (False, 2) and "chunk 2" in v.message
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await get_snapshot(stub, SID)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"snapshot {SID} is corrupt: chunk 2" in exc.value.details()
        # prewarm finds it, drops the local copy, and with no peer cannot repair it
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "chunk 2" in exc.value.details() and "no peers configured" in exc.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_prewarm_fetches_from_peer_and_repairs_corruption(tmp_path: Path) -> None:
    data = arena(3 * CHUNK + 99, seed=5)
    async with running_blobstore(tmp_path / "a") as a:
        await put_snapshot(a.address, SID, data, CHUNK)
        async with running_blobstore(tmp_path / "b", peers=(a.address,)) as b, channel(b.address) as ch:
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
            warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
            assert (warm.was_cached, warm.fetched_from_peer, warm.bytes) == (False, True, len(data))
            stat = await stub.StatSnapshot(blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=T)
            assert stat.on_disk and stat.in_cache
            assert (await get_snapshot(stub, SID))[1] == data

            # B's disk copy goes bad while not cached: the next prewarm refetches it from A
            await stub.DeleteSnapshot(blobstore_pb2.DeleteSnapshotRequest(snapshot_id=SID), timeout=T)
            await put_snapshot(b.address, SID, data, CHUNK)
            corrupt_chunk(tmp_path / "b", 1)
            warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
            assert warm.fetched_from_peer
            v = await stub.VerifySnapshot(blobstore_pb2.VerifySnapshotRequest(snapshot_id=SID), timeout=T)
            assert v.ok and v.bad_chunk == -1


async def test_peer_with_corrupt_copy_is_not_trusted(tmp_path: Path) -> None:
    data = arena(2 * CHUNK, seed=9)
    async with running_blobstore(tmp_path / "a") as a:
        await put_snapshot(a.address, SID, data, CHUNK)
        corrupt_chunk(tmp_path / "a", 0)
        async with running_blobstore(tmp_path / "b", peers=(a.address,)) as b, channel(b.address) as ch:
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND and a.address in exc.value.details()
            assert not list((tmp_path / "b").glob("d*/snapshots/*/manifest.json"))


async def test_prewarm_fetches_from_the_peers_a_request_names(tmp_path: Path) -> None:
    """No configured peers: the caller names them (the nodeagent, from etcd), with the record's
    manifest digest; a peer whose manifest has another digest is skipped."""
    data, other = arena(2 * CHUNK + 7, seed=3), arena(2 * CHUNK + 7, seed=4)
    async with running_blobstore(tmp_path / "a") as a, running_blobstore(tmp_path / "x") as x:
        put = await put_snapshot(a.address, SID, data, CHUNK)
        await put_snapshot(x.address, SID, other, CHUNK)
        async with running_blobstore(tmp_path / "b") as b, channel(b.address) as ch:
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # nobody named, none configured
                await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID, peers=["a:b"]),
                                           timeout=T)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "peers" in exc.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # x's copy is another snapshot
                await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(
                    snapshot_id=SID, peers=[x.address], manifest_digest=put.manifest_digest), timeout=T)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND and x.address in exc.value.details()
            warm = await stub.PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(
                snapshot_id=SID, peers=[x.address, a.address], manifest_digest=put.manifest_digest), timeout=T)
            assert (warm.was_cached, warm.fetched_from_peer, warm.bytes) == (False, True, len(data))
            assert (await get_snapshot(stub, SID))[1] == data


async def test_a_silent_peer_is_passed_over_quickly(tmp_path: Path) -> None:
    """A peer whose host accepts nothing it can speak to (here: a socket that listens and never
    answers) costs the connect bound, not gRPC's whole connect attempt; the next one serves."""
    data = arena(CHUNK, seed=7)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        async with running_blobstore(tmp_path / "a") as a, running_blobstore(tmp_path / "b") as b, \
                channel(b.address) as ch:
            await put_snapshot(a.address, SID, data, CHUNK)
            began = time.monotonic()
            warm = await blobstore_pb2_grpc.BlobstoreServiceStub(ch).PrewarmSnapshot(blobstore_pb2.PrewarmSnapshotRequest(
                snapshot_id=SID, peers=[f"127.0.0.1:{silent.getsockname()[1]}", a.address]), timeout=T)
            assert warm.fetched_from_peer and time.monotonic() - began < 12
