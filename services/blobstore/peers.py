"""Fetching a snapshot from peer blobstores over GetSnapshot, verifying every chunk."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from services.blobstore import manifest as mf
from services.blobstore.store.base import SnapshotStore
from snapwake import errors
from snapwake.grpcclient import blocking_stream
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

__all__ = ["PeerFetcher"]

log = logging.getLogger(__name__)
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class PeerFetcher:
    """Asks each peer in turn; the first that streams a snapshot whose chunks all verify wins.

    Blocking gRPC on purpose: fetches run on the blobstore's worker threads, shared by the
    asyncio gRPC servicer and the threaded handover socket.
    """

    def __init__(self, peers: tuple[str, ...], timeout: float = 600.0) -> None:
        self.peers, self.timeout = peers, timeout

    def fetch(self, sid: str, store: SnapshotStore) -> str | None:
        """Stores ``sid`` from the first peer that has a good copy; returns that peer, or None."""
        for peer in self.peers:
            try:
                self._fetch_one(peer, sid, store)
            except errors.NotFound:
                continue
            except errors.SnapwakeError as exc:
                log.warning("peer %s could not give %s: %s", peer, sid, exc)
                continue
            log.info("fetched %s from peer %s", sid, peer)
            return peer
        return None

    def _fetch_one(self, peer: str, sid: str, store: SnapshotStore) -> None:
        with grpc.insecure_channel(peer, options=_OPTIONS) as ch:
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
            stream = blocking_stream(stub.GetSnapshot, blobstore_pb2.GetSnapshotRequest(snapshot_id=sid),
                                     timeout=self.timeout)
            first = next(stream, None)
            if first is None or not first.HasField("manifest"):
                raise errors.InvalidArgument(f"peer {peer} sent data before the manifest", field="manifest")
            m = mf.validate(first.manifest, sid)
            self._receive(m, stream, store)

    def _receive(self, m: mf.Manifest, stream: Iterator[blobstore_pb2.GetSnapshotResponse],
                 store: SnapshotStore) -> None:
        writer = store.begin(m)
        try:
            index, buf = 0, bytearray()
            for msg in stream:
                buf += msg.data
                while index < len(m.chunk_sha256) and len(buf) >= mf.chunk_span(m, index)[1]:
                    n = mf.chunk_span(m, index)[1]
                    writer.write_chunk(index, memoryview(bytes(buf[:n])))  # verifies the checksum
                    del buf[:n]
                    index += 1
            if buf or index != len(m.chunk_sha256):
                raise errors.InvalidArgument(f"data: stream of {m.snapshot_id} ended at chunk {index}", field="data")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
