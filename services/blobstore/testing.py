"""Helpers for tests (ours and other services'): a real blobstore in-process, and a put client."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from services.blobstore import manifest as mf
from services.blobstore.app import BlobstoreApp
from services.blobstore.config import BlobstoreConfig
from snapwake.grpcserver import channel
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

__all__ = ["put_snapshot", "running_blobstore"]


@contextlib.asynccontextmanager
async def running_blobstore(root: Path, peers: tuple[str, ...] = (), stripes: int = 2,
                            cache_bytes: int = 4 << 20, chunk_bytes: int = 64 << 10,
                            gpu: str = "false", **settings: Any) -> AsyncIterator[BlobstoreApp]:
    """A blobstore on a free loopback port, stripes under ``root``, memfd handover unless ``gpu``;
    ``settings`` are more ``BlobstoreConfig`` fields (the ``handover_*`` limits, say).

    The handover socket lives in a short /tmp directory: Unix socket paths are limited to 107 bytes.
    """
    sock_dir = Path(tempfile.mkdtemp(prefix="bs-", dir="/tmp"))
    cfg = BlobstoreConfig(listen="127.0.0.1:0", dirs=tuple(str(root / f"d{k}") for k in range(stripes)),
                          handover_socket=str(sock_dir / "h.sock"), cache_bytes=cache_bytes,
                          chunk_bytes=chunk_bytes, peers=peers, gpu=gpu, **settings)
    app = BlobstoreApp(cfg)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=1.0)
        with contextlib.suppress(OSError):
            os.rmdir(sock_dir)  # the server already unlinked its socket


async def put_snapshot(address: str, sid: str, data: bytes, chunk_bytes: int,
                       message_bytes: int = 100_000, deadline: float = 30.0,
                       tls: ClientTls | None = None) -> blobstore_pb2.PutSnapshotResponse:
    """Streams ``data`` as snapshot ``sid`` to the blobstore at ``address`` (presenting ``tls``'s
    certificate: its node's nodeagent's, where the blobstore runs with TLS)."""
    m = mf.fill_checksums(blobstore_pb2.Manifest(snapshot_id=sid, arena_bytes=len(data)), memoryview(data), chunk_bytes)

    async def messages() -> AsyncIterator[blobstore_pb2.PutSnapshotRequest]:
        yield blobstore_pb2.PutSnapshotRequest(manifest=m)
        for off in range(0, len(data), message_bytes):
            yield blobstore_pb2.PutSnapshotRequest(data=data[off:off + message_bytes])

    async with channel(address, tls) as ch:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
        return await stub.PutSnapshot(messages(), timeout=deadline)
