"""The snapshot store interface, shared by the striped disk store and the in-memory one.

A snapshot is a manifest plus ``chunk_count`` chunks. Every read is checked against the chunk's
sha256 in the manifest; a mismatch or a missing chunk raises ``CorruptSnapshot``, never data.
Writes become visible only at ``SnapshotWriter.commit``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from services.blobstore import manifest as mf
from services.blobstore.manifest import Manifest
from snapwake import errors

__all__ = ["CorruptSnapshot", "SnapshotStore", "SnapshotWriter"]


class CorruptSnapshot(errors.FailedPrecondition):
    """A chunk failed its checksum or is missing; the snapshot must be refetched, not served."""

    def __init__(self, snapshot_id: str, chunk: int, detail: str = "sha256 mismatch") -> None:
        super().__init__(f"snapshot {snapshot_id} is corrupt: chunk {chunk}: {detail}", field="chunk")
        self.snapshot_id = snapshot_id
        self.chunk = chunk


def check_chunk(m: Manifest, index: int, data: bytes | memoryview) -> None:
    """Raises CorruptSnapshot unless ``data`` is chunk ``index`` of ``m``."""
    if mf.sha256(data) != m.chunk_sha256[index]:
        raise CorruptSnapshot(m.snapshot_id, index)


class SnapshotWriter(abc.ABC):
    """Writes one snapshot's chunks (from any thread, in any order), then commits atomically."""

    def __init__(self, m: Manifest) -> None:
        self.manifest = mf.validate(m)

    @abc.abstractmethod
    def write_chunk(self, index: int, data: memoryview) -> None:
        """Stores chunk ``index``; InvalidArgument if it does not match its checksum."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Makes the snapshot visible (replacing an older copy of the same id)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops everything written so far."""

    def check(self, index: int, data: memoryview) -> None:
        if not 0 <= index < len(self.manifest.chunk_sha256):
            raise errors.InvalidArgument(f"chunk {index} out of range", field="data")
        start, length = mf.chunk_span(self.manifest, index)
        if len(data) != length or mf.sha256(data) != self.manifest.chunk_sha256[index]:
            raise errors.InvalidArgument(
                f"data: chunk {index} of {self.manifest.snapshot_id} does not match manifest.chunk_sha256 "
                f"({len(data)} bytes, expected {length})", field="data")


class SnapshotStore(abc.ABC):
    """Where committed snapshots live. Subclasses implement the per-chunk primitives."""

    def __init__(self, workers: int = 8) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blob-io")

    @abc.abstractmethod
    def begin(self, m: Manifest) -> SnapshotWriter:
        """A writer for a new snapshot (``m`` must carry every chunk's checksum)."""

    @abc.abstractmethod
    def manifest(self, sid: str) -> Manifest:
        """The committed manifest; NotFound if the snapshot is not stored."""

    @abc.abstractmethod
    def list(self) -> list[Manifest]:
        """Every committed snapshot's manifest."""

    @abc.abstractmethod
    def read_chunk_into(self, m: Manifest, index: int, dest: memoryview) -> None:
        """Reads chunk ``index`` into ``dest`` (exactly its length) and verifies it."""

    @abc.abstractmethod
    def delete(self, sid: str) -> bool:
        """Removes the snapshot; False if it was not there."""

    def contains(self, sid: str) -> bool:
        try:
            self.manifest(sid)
        except errors.NotFound:
            return False
        return True

    def put(self, m: Manifest, data: memoryview) -> None:
        """Writes the whole arena ``data``, its chunks in parallel, then commits."""
        writer = self.begin(m)
        try:
            self.each_chunk(m, lambda i, s, n: writer.write_chunk(i, data[s:s + n]))
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def chunk_reader(self, m: Manifest) -> Callable[[int, memoryview], memoryview]:
        """``read(index, room)``: chunk ``index`` of ``m`` read into the start of ``room`` (at
        least the chunk's length), verified; returns the chunk's bytes (a prefix of ``room``)."""
        def read(index: int, room: memoryview) -> memoryview:
            length = mf.chunk_span(m, index)[1]
            self.read_chunk_into(m, index, room[:length])
            return room[:length]
        return read

    def read_into(self, m: Manifest, dest: memoryview) -> None:
        """Reads every chunk of ``m`` into ``dest`` in parallel, verifying each."""
        self.each_chunk(m, lambda i, s, n: self.read_chunk_into(m, i, dest[s:s + n]))

    def verify(self, sid: str) -> int:
        """Index of the first bad chunk, or -1 when every chunk matches its checksum."""
        m = self.manifest(sid)
        for i in range(len(m.chunk_sha256)):
            buf = bytearray(mf.chunk_span(m, i)[1])
            try:
                self.read_chunk_into(m, i, memoryview(buf))
            except CorruptSnapshot as exc:
                return exc.chunk
        return -1

    def each_chunk(self, m: Manifest, fn: Callable[[int, int, int], None]) -> None:
        """Runs ``fn(index, offset, length)`` for every chunk on the I/O pool; re-raises the first error."""
        futures = [self.pool.submit(fn, i, *mf.chunk_span(m, i))
                   for i in range(mf.chunk_count(m.arena_bytes, m.chunk_bytes))]
        wait(futures)
        bad = [f.exception() for f in futures if f.exception() is not None]
        if bad:
            corrupt = sorted((e for e in bad if isinstance(e, CorruptSnapshot)), key=lambda e: e.chunk)
            raise (corrupt or bad)[0]  # type: ignore[misc]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
