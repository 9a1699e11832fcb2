"""Fetching a snapshot from peer blobstores over GetSnapshot, verifying every chunk.

Which peers: those the caller names for this fetch (the nodeagent reads the nodes that hold the
snapshot, and their advertised blobstore addresses, from etcd), then the configured ones. The
blobstore itself never reads etcd. With the snapshot record's manifest digest in hand, the
request names it (the peer refuses to serve another copy) and a peer whose manifest differs
anyway is refused and logged: its chunks would verify against the wrong checksums. A peer's
manifest may declare chunks of at most ``max_chunk_bytes`` (each is buffered whole before its
checksum is checked) and its stream may not run past the manifest's arena.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import grpc

from services.blobstore import manifest as mf
from services.blobstore.store.base import SnapshotStore
from snapwake import errors
from snapwake.grpcclient import blocking_channel, blocking_stream
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

__all__ = ["PeerFetcher"]

log = logging.getLogger(__name__)
# A peer sends data in messages of 1 MiB (``api.MESSAGE_BYTES``); a manifest may be larger.
_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 1 << 20)]


class PeerFetcher:
    """Asks each peer in turn; the first that streams a snapshot whose chunks all verify wins.

    Blocking gRPC on purpose: fetches run on the blobstore's worker threads, shared by the
    asyncio gRPC servicer and the threaded handover socket.
    """

    def __init__(self, peers: tuple[str, ...], timeout: float = 600.0, connect_timeout: float = 5.0,
                 max_chunk_bytes: int = mf.MAX_CHUNK_BYTES, tls: ClientTls | None = None) -> None:
        """``tls``: this blobstore's own certificate, presented to peers (who allow a blobstore
        identity GetSnapshot and StatSnapshot only)."""
        self.peers, self.timeout, self.connect_timeout = peers, timeout, connect_timeout
        self.max_chunk_bytes = max_chunk_bytes
        self.tls = tls

    def candidates(self, extra: Sequence[str] = ()) -> list[str]:
        """``extra`` then the configured peers, each once."""
        return list(dict.fromkeys([*extra, *self.peers]))

    def fetch(self, sid: str, store: SnapshotStore, extra: Sequence[str] = (), digest: str = "") -> str | None:
        """Stores ``sid`` from the first of ``candidates(extra)`` that has a good copy (whose
        manifest has ``digest``, when given); returns that peer, or None."""
        for peer in self.candidates(extra):
            try:
                self._fetch_one(peer, sid, store, digest)
            except errors.NotFound:
                continue
            except errors.SnapwakeError as exc:
                log.warning("peer %s could not give %s: %s", peer, sid, exc)
                continue
            log.info("fetched %s from peer %s", sid, peer)
            return peer
        return None

    def _fetch_one(self, peer: str, sid: str, store: SnapshotStore, digest: str) -> None:
        with blocking_channel(peer, self.tls, server_role="blobstore", options=_OPTIONS) as ch:
            # A peer whose host went silent would hold the fetch (and the snapshot's lock) for
            # gRPC's whole connect attempt; the next peer is asked instead.
            try:
                grpc.channel_ready_future(ch).result(timeout=self.connect_timeout)
            except grpc.FutureTimeoutError:
                raise errors.Unavailable(f"peer {peer} did not connect within {self.connect_timeout:g}s") from None
            stub = blobstore_pb2_grpc.BlobstoreServiceStub(ch)
            request = blobstore_pb2.GetSnapshotRequest(snapshot_id=sid, manifest_digest=digest)
            stream = blocking_stream(stub.GetSnapshot, request, timeout=self.timeout)
            first = next(stream, None)
            if first is None or not first.HasField("manifest"):
                raise errors.InvalidArgument(f"peer {peer} sent data before the manifest", field="manifest")
            try:
                m = mf.validate(first.manifest, sid, max_chunk_bytes=self.max_chunk_bytes)
                if digest:
                    mf.check_digest(m, digest, f"peer {peer}")
            except errors.InvalidArgument as exc:
                log.error("refused %s from peer %s: %s", sid, peer, exc.message)
                raise
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
                if index == len(m.chunk_sha256) and buf:
                    raise errors.InvalidArgument(f"data: stream of {m.snapshot_id} runs past its "
                                                 f"{m.arena_bytes} bytes", field="data")
            if buf or index != len(m.chunk_sha256):
                raise errors.InvalidArgument(f"data: stream of {m.snapshot_id} ended at chunk {index}", field="data")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
