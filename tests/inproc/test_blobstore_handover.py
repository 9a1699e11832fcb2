"""The handover socket with a real client speaking snapwake.protocols, memfd arenas (no GPU)."""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from pathlib import Path
from typing import Any

from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.grpcserver import channel
from snapwake.protocols import recv_message, seal_memfd, send_message
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

SID = "acme/default/llama@7"
CHUNK = 64 << 10


def arena(n: int, seed: int = 3) -> bytes:
    return bytes((i * seed + i // 4099) % 256 for i in range(n))


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def store(path: str, sid: str, data: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the model server does on ``snapshot``: hand a memfd with the arena to the blobstore."""
    fd = os.memfd_create("arena", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        seal_memfd(fd)  # the blobstore refuses a memfd that could shrink under its mapping
        with _connect(path) as sock:
            send_message(sock, {"op": "store", "snapshot_id": sid, "manifest": manifest, "gpu": -1}, fds=[fd])
            return recv_message(sock)[0]
    finally:
        os.close(fd)


def load(path: str, sid: str, op: str = "load") -> tuple[dict[str, Any], bytes | None]:
    """What the model server does on ``attach``: take the fd, map it, say "mapped"."""
    with _connect(path) as sock:
        if op == "prepare":
            send_message(sock, {"op": "prepare", "snapshot_id": sid, "gpu": -1})
            assert recv_message(sock)[0] == {"ok": True}
        send_message(sock, {"op": "load", "snapshot_id": sid, "gpu": -1})
        reply, fds = recv_message(sock)
        if not reply["ok"]:
            assert fds == []
            return reply, None
        (fd,) = fds
        with mmap.mmap(fd, reply["bytes"], prot=mmap.PROT_READ) as mem:
            data = bytes(mem)
        os.close(fd)
        send_message(sock, {"op": "mapped"})
        return reply, data


async def test_store_then_load_memfd(tmp_path: Path) -> None:
    data = arena(3 * CHUNK + 500)
    manifest = {"snapshot_id": SID, "arena_bytes": len(data), "modelserver_config_json": "{\"layers\": 2}",
                "tensors": [{"name": "w", "dtype": "bf16", "shape": [2, 4], "offset": "0", "nbytes": "16"}]}
    async with running_blobstore(tmp_path) as app, channel(app.address) as ch:
        sock = app.cfg.handover_socket
        reply = await asyncio.to_thread(store, sock, SID, data, manifest)
        assert reply["ok"] and reply["bytes"] == len(data)
        stat = await blobstore_pb2_grpc.BlobstoreServiceStub(ch).StatSnapshot(
            blobstore_pb2.StatSnapshotRequest(snapshot_id=SID), timeout=30)
        assert stat.on_disk and stat.in_cache and stat.manifest_digest == reply["manifest_digest"]
        assert len(stat.manifest.chunk_sha256) == 4 and stat.manifest.chunk_bytes == CHUNK

        got, loaded = await asyncio.to_thread(load, sock, SID)
        assert loaded == data
        assert got["bytes"] == got["alloc_bytes"] == len(data) and got["dma_seconds"] >= 0
        assert got["manifest"]["tensors"][0]["name"] == "w"
        assert got["manifest"]["modelserver_config_json"] == "{\"layers\": 2}"


async def test_prepare_then_load_and_many_clients(tmp_path: Path) -> None:
    data = arena(2 * CHUNK + 1, seed=11)
    async with running_blobstore(tmp_path) as app:
        await put_snapshot(app.address, SID, data, CHUNK)  # on disk, not cached: load fills the cache
        sock = app.cfg.handover_socket
        reply, loaded = await asyncio.to_thread(load, sock, SID, "prepare")
        assert reply["ok"] and loaded == data
        results = await asyncio.gather(*[asyncio.to_thread(load, sock, SID) for _ in range(6)])
        assert [r[1] for r in results] == [data] * 6


async def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    data = arena(2 * CHUNK)
    async with running_blobstore(tmp_path) as app:
        sock = app.cfg.handover_socket
        reply, _ = await asyncio.to_thread(load, sock, "acme/default/missing@1")
        assert not reply["ok"] and "acme/default/missing@1 not found" in reply["error"]
        reply, _ = await asyncio.to_thread(load, sock, "Bad Id")
        assert not reply["ok"] and reply["error"].startswith("snapshot_id:")

        await put_snapshot(app.address, SID, data, CHUNK)
        chunk = next((tmp_path / "d1").glob("snapshots/*/*/000001.chunk"))
        chunk.write_bytes(b"\0" * CHUNK)
        reply, _ = await asyncio.to_thread(load, sock, SID)
        assert not reply["ok"] and f"snapshot {SID} is corrupt: chunk 1" in reply["error"]


async def test_store_without_fd_is_refused(tmp_path: Path) -> None:
    async with running_blobstore(tmp_path) as app:
        def go() -> dict[str, Any]:
            with _connect(app.cfg.handover_socket) as sock:
                send_message(sock, {"op": "store", "snapshot_id": SID, "manifest": {"arena_bytes": 5}})
                return recv_message(sock)[0]
        reply = await asyncio.to_thread(go)
        assert reply == {"ok": False, "error": "fd: store needs exactly one file descriptor, got 0"}
        async with channel(app.address) as ch:
            listing = await blobstore_pb2_grpc.BlobstoreServiceStub(ch).ListSnapshots(
                blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=30)
        assert list(listing.snapshots) == []
