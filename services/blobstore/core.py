"""Blobstore: the synchronous logic behind both the gRPC API and the handover socket.

Thread-safe; every operation on one snapshot id runs under that id's lock, so a fill, a
refetch and a store never race. A corrupt or missing chunk found while filling the cache drops
the local copy and refetches it from a peer; it is never served.

A pre-warm names the manifest digest the snapshot record in etcd holds (the blobstore never
reads etcd itself); it is remembered for that snapshot, and the local copy (disk or cache) is
checked against it before anything is served from it: a copy with another manifest is dropped,
logged, and fetched again from a peer whose manifest has that digest.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from services.blobstore import manifest as mf
from services.blobstore.cache import HostCache
from services.blobstore.device import Exported, Loader
from services.blobstore.ids import check_snapshot_id
from services.blobstore.manifest import Manifest
from services.blobstore.metrics import BlobStats
from services.blobstore.peers import PeerFetcher
from services.blobstore.store.base import CorruptSnapshot, SnapshotStore, SnapshotWriter, check_chunk
from services.blobstore.stream import Streamer
from snapwake import errors, telemetry

__all__ = ["Blobstore", "Prewarmed", "Stat"]

log = logging.getLogger(__name__)
_DIGEST = re.compile(r"[0-9a-f]{64}")
Progress = Callable[[int], None]


def _checked_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise errors.InvalidArgument(f"manifest_digest: expected 64 lowercase hex digits, got {digest[:80]!r}",
                                     field="manifest_digest")
    return digest


@dataclasses.dataclass(frozen=True)
class Stat:
    manifest: Manifest
    on_disk: bool
    in_cache: bool


@dataclasses.dataclass(frozen=True)
class Prewarmed:
    was_cached: bool
    fetched_from_peer: bool
    nbytes: int


class Blobstore:
    """Store + cache + peers + loaders. ``cuda`` is None on hosts without a GPU."""

    def __init__(self, store: SnapshotStore, cache: HostCache, peers: PeerFetcher, memfd: Loader,
                 cuda: Loader | None = None, gpu_count: int = 0, chunk_bytes: int = 64 << 20,
                 prepare_ttl: float = 60.0, max_chunk_bytes: int = mf.MAX_CHUNK_BYTES,
                 streamer: Streamer | None = None) -> None:
        self.store, self.cache, self.peers = store, cache, peers
        self.streamer = streamer  # the miss path: disk straight into exportable memory (None: via the cache)
        self.memfd, self.cuda, self.gpu_count = memfd, cuda, gpu_count
        self.chunk_bytes, self.prepare_ttl, self.max_chunk_bytes = chunk_bytes, prepare_ttl, max_chunk_bytes
        self._digests: dict[str, str] = {}  # the manifest digest each snapshot's record says (pre-warms)
        self.workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-prepare")
        self._locks: dict[str, threading.Lock] = {}
        self._prepared: dict[tuple[str, int], Future[Exported]] = {}
        self._meta = threading.Lock()
        self.progress: dict[str, int] = {}  # bytes written so far, per snapshot being stored
        self.stats = BlobStats()  # cache hits and DMA totals, for /metrics

    def _lock(self, sid: str) -> threading.Lock:
        with self._meta:
            return self._locks.setdefault(sid, threading.Lock())

    # -- queries -------------------------------------------------------------------------
    def stat(self, sid: str) -> Stat:
        check_snapshot_id(sid)
        in_cache = self.cache.contains(sid)
        try:
            return Stat(self.store.manifest(sid), True, in_cache)
        except errors.NotFound:
            with self.cache.use(sid) as entry:
                if entry is None:
                    raise
                return Stat(entry.manifest, False, True)

    def list(self) -> list[Stat]:
        return [Stat(m, True, self.cache.contains(m.snapshot_id)) for m in self.store.list()]

    def verify(self, sid: str) -> int:
        """Index of the first bad chunk on disk, or -1."""
        return self.store.verify(check_snapshot_id(sid))

    def delete(self, sid: str) -> None:
        with self._lock(check_snapshot_id(sid)):
            in_cache, on_disk = self.cache.remove(sid), self.store.delete(sid)
            self._digests.pop(sid, None)
        if not (in_cache or on_disk):
            raise errors.NotFound(f"snapshot {sid} not found")
        log.info("deleted %s", sid)

    def read_chunk(self, m: Manifest, index: int) -> bytes:
        """Chunk ``index``, from the cache if there, verified against its checksum either way."""
        start, length = mf.chunk_span(m, index)
        with self.cache.use(m.snapshot_id) as entry:
            if entry is not None and entry.manifest.chunk_sha256 == m.chunk_sha256:
                data = bytes(entry.view[start:start + length])
                check_chunk(m, index, data)
                return data
        buf = bytearray(length)
        self.store.read_chunk_into(m, index, memoryview(buf))
        return bytes(buf)

    # -- writes ----------------------------------------------------------------------------
    def begin_put(self, m: Manifest, sid: str | None = None) -> SnapshotWriter:
        """A writer for PutSnapshot; the stale cached copy (if any) goes at commit time."""
        mf.validate(m, sid, max_chunk_bytes=self.max_chunk_bytes)
        writer = self.store.begin(m)
        commit = writer.commit

        def commit_and_invalidate() -> None:
            with self._lock(m.snapshot_id):
                commit()
                # The remembered digest stays: the record in etcd, not an upload, says which copy counts.
                self.cache.remove(m.snapshot_id)
                self._drop_prepared(m.snapshot_id)
        writer.commit = commit_and_invalidate  # type: ignore[method-assign]
        return writer

    def store_arena(self, sid: str, manifest_json: object, fd: int, gpu: int,
                    progress: Progress | None = None) -> tuple[Manifest, str]:
        """Copies the arena behind ``fd`` into the cache, checksums it, writes it striped."""
        check_snapshot_id(sid)
        m = mf.from_dict(manifest_json)
        m.snapshot_id = m.snapshot_id or sid
        m.chunk_bytes = m.chunk_bytes or self.chunk_bytes
        mf.validate(m, sid, need_checksums=False)
        loader = self._loader(gpu)
        with self._lock(sid):
            self.cache.remove(sid)
            entry, evicted = self.cache.reserve(m)
            try:
                loader.import_into(fd, m.arena_bytes, gpu, entry.view, entry.address)
                full = mf.fill_checksums(m, entry.view, self.chunk_bytes)
                self._write(full, entry.view, progress)
                self.cache.commit(sid, full)
                self._digests[sid] = mf.digest(full)  # what its record will say once the store is noted
                self._drop_prepared(sid)
            except BaseException:
                self.cache.abandon(sid)
                raise
            finally:
                self.progress.pop(sid, None)
        log.info("stored %s from %s: %d bytes (evicted %s)", sid, f"gpu {gpu}" if gpu >= 0 else "memfd",
                 full.arena_bytes, evicted or "nothing")
        return full, mf.digest(full)

    def _write(self, m: Manifest, data: memoryview, progress: Progress | None) -> None:
        writer = self.store.begin(m)
        done, lock = [0], threading.Lock()
        self.progress[m.snapshot_id] = 0

        def write(index: int, start: int, length: int) -> None:
            writer.write_chunk(index, data[start:start + length])
            with lock:
                done[0] += length
                self.progress[m.snapshot_id] = done[0]
                if progress is not None:
                    progress(done[0])
        try:
            self.store.each_chunk(m, write)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    # -- cache fill --------------------------------------------------------------------------
    def prewarm(self, sid: str, peers: Sequence[str] = (), digest: str = "") -> Prewarmed:
        """Makes sure ``sid`` is in the cache, from disk or else from a peer (``peers`` first,
        then the configured ones). With a manifest ``digest`` (the snapshot record's; else the
        one a pre-warm named before), only a copy with that manifest is kept or taken."""
        check_snapshot_id(sid)
        with self._lock(sid):
            if digest:
                self._digests[sid] = _checked_digest(digest)
            digest = self._digests.get(sid, "")
            with self.cache.use(sid) as entry:
                self.stats.lookup(entry is not None)
                if entry is not None and self._matches(entry.manifest, digest, "the cached copy"):
                    return Prewarmed(True, False, entry.manifest.arena_bytes)
            self.cache.remove(sid)  # another manifest (if it was there at all): never served
            from_peer = False
            if self.store.contains(sid) and not self._matches(self.store.manifest(sid), digest, "the copy on disk"):
                self.store.delete(sid)
            if not self.store.contains(sid):
                self._refetch(sid, None, peers, digest)
                from_peer = True
            try:
                m = self._read_to_cache(sid)
            except CorruptSnapshot as exc:
                log.error("%s; dropping the local copy and refetching", exc.message)
                self.store.delete(sid)
                self._refetch(sid, exc, peers, digest)
                from_peer = True
                m = self._read_to_cache(sid)
        log.info("pre-warmed %s (%d bytes%s)", sid, m.arena_bytes, ", from a peer" if from_peer else "")
        return Prewarmed(False, from_peer, m.arena_bytes)

    def _matches(self, m: Manifest, digest: str, what: str) -> bool:
        """True if ``m`` has ``digest`` (or none is known); logs the mismatch otherwise."""
        try:
            if digest:
                mf.check_digest(m, digest, what)
        except errors.InvalidArgument as exc:
            log.error("%s; dropping it and fetching the recorded one", exc.message)
            return False
        return True

    def check_served(self, m: Manifest, expected: str = "") -> None:
        """Raises FailedPrecondition unless ``m`` has the digest a peer asked for (``expected``)
        and the one a pre-warm recorded for it: a copy with another manifest is never served."""
        for digest, who in ((expected, "the requester"), (self._digests.get(m.snapshot_id, ""), "its record")):
            if digest and mf.digest(m) != digest:
                log.warning("not serving %s: its manifest (digest %s) is not the one %s names (%s)",
                            m.snapshot_id, mf.digest(m)[:12], who, digest[:12])
                raise errors.FailedPrecondition(f"snapshot {m.snapshot_id} here has manifest digest "
                                                f"{mf.digest(m)[:12]}, not {digest[:12]} as {who} names",
                                                field="manifest_digest")

    def _refetch(self, sid: str, cause: CorruptSnapshot | None, peers: Sequence[str] = (), digest: str = "") -> None:
        if self.peers.fetch(sid, self.store, peers, digest) is not None:
            return
        tried = self.peers.candidates(peers)
        where = f"on peers {', '.join(tried)}" if tried else "(no peers configured)"
        if cause is not None:
            raise CorruptSnapshot(sid, cause.chunk, f"checksum failed; local copy dropped and no good copy {where}")
        raise errors.NotFound(f"snapshot {sid} not found locally nor {where}")

    def _read_to_cache(self, sid: str) -> Manifest:
        m = self.store.manifest(sid)
        if self.streamer is not None and self.streamer.can_stage(m):
            admitted = self.cache.try_reserve(m)
            if admitted is None:
                # Not admitted (larger than the cache takes, or the room is in use): every chunk on
                # disk is verified instead, and a start streams it from disk (``_export_from_disk``).
                self.streamer.stream(m, lambda _offset, _data, _address: None)
                log.info("verified %s on disk (%d bytes); the cache does not admit it", sid, m.arena_bytes)
                return m
            entry = admitted[0]
        else:
            entry, _evicted = self.cache.reserve(m)
        try:
            self.store.read_into(m, entry.view)
        except BaseException:
            self.cache.abandon(sid)
            raise
        self.cache.commit(sid)
        return m

    # -- exportable memory -----------------------------------------------------------------
    def _loader(self, gpu: int) -> Loader:
        if gpu < 0:
            return self.memfd
        if self.cuda is None or gpu >= self.gpu_count:
            raise errors.InvalidArgument(
                f"gpu: no GPU {gpu} on this host ({self.gpu_count} GPUs); use -1 for host memory", field="gpu")
        return self.cuda

    def load(self, sid: str, gpu: int) -> Exported:
        """Exportable memory filled with ``sid``: the prepared one if any, else made now."""
        check_snapshot_id(sid)
        with self._meta:
            prepared = self._prepared.pop((sid, gpu), None)
        if prepared is not None:
            return prepared.result()
        return self._export(sid, gpu)

    def _export(self, sid: str, gpu: int) -> Exported:
        loader = self._loader(gpu)
        for _attempt in range(2):  # an eviction between fill and use is retried once
            streamed = self._export_from_disk(sid, gpu, loader)  # a miss with a good copy on disk
            if streamed is not None:
                return streamed
            self.prewarm(sid)  # a hit, or a copy fetched (and cached if admitted), or a bad one refetched
            with self.cache.use(sid) as entry:
                if entry is not None:
                    with telemetry.traced("dma", attributes={"snapwake.snapshot_id": sid, "snapwake.gpu": gpu}):
                        exported = loader.export(entry, gpu)
                    self.stats.dma(exported.nbytes, exported.dma_seconds)
                    return exported
        raise errors.ResourceExhausted(f"cache: {sid} was neither streamed from disk nor kept in the cache "
                                       f"(evicted twice while loading); cache too small")

    def _export_from_disk(self, sid: str, gpu: int, loader: Loader) -> Exported | None:
        """The miss path: ``sid``'s chunks streamed from disk into exportable memory, verified on
        the way, read into its cache slot when the cache admits it, else through staging buffers.
        None (the caller takes the cache path, which refetches what is bad or missing) when it is
        cached, not on disk, not the recorded manifest, or a chunk fails its checksum."""
        streamer = self.streamer
        if streamer is None:
            return None
        with self._lock(sid):
            if self.cache.contains(sid) or not self.store.contains(sid):
                return None
            m = self.store.manifest(sid)
            if not self._matches(m, self._digests.get(sid, ""), "the copy on disk"):
                return None
            admitted = self.cache.try_reserve(m)
            if admitted is None and not streamer.can_stage(m):
                log.warning("%s: chunks of %d bytes exceed the staging buffers and the cache does not take it; "
                            "reading it through the cache", sid, m.chunk_bytes)
                return None
            self.stats.lookup(False)
            entry = admitted[0] if admitted is not None else None
            room = None if entry is None or entry.room is None else (entry.room, entry.address)
            try:
                # The same span as a hit's DMA (the fill of exportable memory), marked as read from disk.
                with telemetry.traced("dma", attributes={"snapwake.snapshot_id": sid, "snapwake.gpu": gpu,
                                                         "snapwake.source": "disk",
                                                         "snapwake.cached_on_the_way": entry is not None}):
                    exported = loader.export_stream(m.arena_bytes, gpu, lambda sink: streamer.stream(m, sink, room))
            except CorruptSnapshot as exc:
                if entry is not None:
                    self.cache.abandon(sid)
                log.error("%s; reading it through the cache path, which drops it and refetches it", exc.message)
                return None
            except BaseException:
                if entry is not None:
                    self.cache.abandon(sid)
                raise
            if entry is not None:
                self.cache.commit(sid)
        self.stats.dma(exported.nbytes, exported.dma_seconds)
        self.stats.disk(exported.nbytes, exported.dma_seconds)
        rate = exported.nbytes / exported.dma_seconds / 1e9 if exported.dma_seconds > 0 else 0.0
        log.info("loaded %s from disk into %s: %d bytes in %.3f s (%.2f GB/s), %s", sid,
                 f"gpu {gpu}" if gpu >= 0 else "a memfd", exported.nbytes, exported.dma_seconds, rate,
                 f"cached on the way (evicted {', '.join(admitted[1]) or 'nothing'})" if admitted is not None
                 else "past the cache (not admitted)")
        return exported

    def prepare(self, sid: str, gpu: int, digest: str = "") -> None:
        """Starts filling memory for a later ``load``; unclaimed memory is freed after ``prepare_ttl``.
        A manifest ``digest`` (the snapshot record's) is remembered and checked as a pre-warm's is."""
        check_snapshot_id(sid)
        self._loader(gpu)
        if digest:
            with self._lock(sid):
                self._digests[sid] = _checked_digest(digest)
        key = (sid, gpu)
        with self._meta:
            if key in self._prepared:
                return
            # The worker continues the caller's trace (the handover ``prepare`` span).
            fut = self.workers.submit(contextvars.copy_context().run, self._export, sid, gpu)
            self._prepared[key] = fut
        timer = threading.Timer(self.prepare_ttl, self._expire, (key, fut))
        timer.daemon = True
        timer.start()

    def _drop_prepared(self, sid: str) -> None:
        """Prepared memory of ``sid`` holds the copy a store just replaced: freed, never handed out."""
        with self._meta:
            stale = [self._prepared.pop(key) for key in [k for k in self._prepared if k[0] == sid]]
        for fut in stale:
            fut.add_done_callback(_release)

    def _expire(self, key: tuple[str, int], fut: Future[Exported]) -> None:
        with self._meta:
            if self._prepared.get(key) is not fut:
                return
            del self._prepared[key]
        if fut.exception() is None:
            log.warning("prepared memory for %s gpu %d never loaded; freeing it", *key)
            fut.result().release()

    def close(self) -> None:
        with self._meta:
            pending = list(self._prepared.values())
            self._prepared.clear()
        for fut in pending:
            if fut.done() and fut.exception() is None:
                fut.result().release()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.streamer is not None:
            self.streamer.close()
        self.store.close()


def _release(fut: Future[Exported]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().release()
