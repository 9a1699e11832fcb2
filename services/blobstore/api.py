"""The gRPC servicer: thin, async, and every blocking step runs in a worker thread.

Domain errors raised here are answered by ``snapwake.grpcserver.ErrorInterceptor``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from services.blobstore import manifest as mf
from services.blobstore.core import Blobstore, Stat
from services.blobstore.handover import HandoverServer, grant
from services.blobstore.ids import check_snapshot_id
from snapwake import errors
from snapwake.config import parse_address
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

__all__ = ["BlobstoreApi", "MESSAGE_BYTES"]

log = logging.getLogger(__name__)
MESSAGE_BYTES = 1 << 20  # data messages of GetSnapshot stay at or under 1 MiB


def _stat(s: Stat) -> blobstore_pb2.StatSnapshotResponse:
    return blobstore_pb2.StatSnapshotResponse(manifest=s.manifest, on_disk=s.on_disk, in_cache=s.in_cache,
                                   manifest_digest=mf.digest(s.manifest))


class BlobstoreApi(blobstore_pb2_grpc.BlobstoreServiceServicer):
    def __init__(self, core: Blobstore, handover: HandoverServer | None = None) -> None:
        self.core, self.handover = core, handover

    def _handover(self) -> HandoverServer:
        if self.handover is None:
            raise errors.FailedPrecondition("this blobstore serves no handover sockets")
        return self.handover

    async def PutSnapshot(self, request_iterator: AsyncIterator[blobstore_pb2.PutSnapshotRequest],  # noqa: N802
                          context: grpc.aio.ServicerContext) -> blobstore_pb2.PutSnapshotResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("manifest"):
            raise errors.InvalidArgument("manifest: the first message must carry the manifest", field="manifest")
        m = first.manifest
        writer = await asyncio.to_thread(self.core.begin_put, m)  # chunk_bytes is capped there
        try:
            index, buf = 0, bytearray()
            async for msg in request_iterator:
                buf += msg.data
                while index < len(m.chunk_sha256) and len(buf) >= mf.chunk_span(m, index)[1]:
                    n = mf.chunk_span(m, index)[1]
                    await asyncio.to_thread(writer.write_chunk, index, memoryview(bytes(buf[:n])))
                    del buf[:n]
                    index += 1
                if index == len(m.chunk_sha256) and buf:  # never buffer what no chunk will take
                    raise errors.InvalidArgument(f"data: more than the manifest's {m.arena_bytes} bytes",
                                                 field="data")
            if buf or index != len(m.chunk_sha256):
                raise errors.InvalidArgument(
                    f"data: got {index} of {len(m.chunk_sha256)} chunks (+{len(buf)} bytes)", field="data")
            await asyncio.to_thread(writer.commit)
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
        return blobstore_pb2.PutSnapshotResponse(snapshot_id=m.snapshot_id, bytes_written=m.arena_bytes,
                                      manifest_digest=mf.digest(m))

    async def GetSnapshot(self, request: blobstore_pb2.GetSnapshotRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[blobstore_pb2.GetSnapshotResponse]:
        try:
            stat = await asyncio.to_thread(self.core.stat, request.snapshot_id)
            m = stat.manifest
            self.core.check_served(m, request.manifest_digest)
            yield blobstore_pb2.GetSnapshotResponse(manifest=m)
            for index in range(len(m.chunk_sha256)):
                data = await asyncio.to_thread(self.core.read_chunk, m, index)
                for off in range(0, len(data), MESSAGE_BYTES):
                    yield blobstore_pb2.GetSnapshotResponse(data=data[off:off + MESSAGE_BYTES])
        except errors.SnapwakeError as exc:  # a peer's failed fetch is worth a line on this side too
            log.warning("GetSnapshot %s: %s", request.snapshot_id, exc.message)
            raise

    async def StatSnapshot(self, request: blobstore_pb2.StatSnapshotRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> blobstore_pb2.StatSnapshotResponse:
        return _stat(await asyncio.to_thread(self.core.stat, request.snapshot_id))

    async def ListSnapshots(self, request: blobstore_pb2.BlobstoreServiceListSnapshotsRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> blobstore_pb2.BlobstoreServiceListSnapshotsResponse:
        stats = await asyncio.to_thread(self.core.list)
        used, budget = self.core.cache.stats()
        return blobstore_pb2.BlobstoreServiceListSnapshotsResponse(snapshots=[_stat(s) for s in stats],
                                            cache_bytes_used=used, cache_bytes_budget=budget)

    async def DeleteSnapshot(self, request: blobstore_pb2.DeleteSnapshotRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> blobstore_pb2.DeleteSnapshotResponse:
        await asyncio.to_thread(self.core.delete, request.snapshot_id)
        return blobstore_pb2.DeleteSnapshotResponse()

    async def PrewarmSnapshot(self, request: blobstore_pb2.PrewarmSnapshotRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> blobstore_pb2.PrewarmSnapshotResponse:
        for peer in request.peers:
            try:
                parse_address(peer)
            except ValueError as exc:
                raise errors.InvalidArgument(f"peers: {exc}", field="peers") from None
        r = await asyncio.to_thread(self.core.prewarm, request.snapshot_id, tuple(request.peers),
                                    request.manifest_digest)
        return blobstore_pb2.PrewarmSnapshotResponse(was_cached=r.was_cached, fetched_from_peer=r.fetched_from_peer,
                                          bytes=r.nbytes)

    async def VerifySnapshot(self, request: blobstore_pb2.VerifySnapshotRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> blobstore_pb2.VerifySnapshotResponse:
        sid = check_snapshot_id(request.snapshot_id)
        bad = await asyncio.to_thread(self.core.verify, sid)
        msg = "ok" if bad < 0 else f"snapshot {sid} is corrupt: chunk {bad} failed its sha256 check"
        return blobstore_pb2.VerifySnapshotResponse(ok=bad < 0, bad_chunk=bad, message=msg)

    async def OpenInstanceHandover(self, request: blobstore_pb2.OpenInstanceHandoverRequest,  # noqa: N802
                                   context: grpc.aio.ServicerContext) -> blobstore_pb2.OpenInstanceHandoverResponse:
        scope = grant(request.instance_id, request.function_id, request.gpu_index)
        path = await asyncio.to_thread(self._handover().open_instance, scope, Path(request.instance_dir))
        return blobstore_pb2.OpenInstanceHandoverResponse(socket_path=str(path))

    async def CloseInstanceHandover(self, request: blobstore_pb2.CloseInstanceHandoverRequest,  # noqa: N802
                                    context: grpc.aio.ServicerContext) -> blobstore_pb2.CloseInstanceHandoverResponse:
        closed = await asyncio.to_thread(self._handover().close_instance, request.instance_id)
        return blobstore_pb2.CloseInstanceHandoverResponse(was_open=closed)
