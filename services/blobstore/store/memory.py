"""An in-memory SnapshotStore with the same semantics as the striped one (for unit tests)."""

from __future__ import annotations

import threading

from services.blobstore import manifest as mf
from services.blobstore.manifest import Manifest
from services.blobstore.store.base import CorruptSnapshot, SnapshotStore, SnapshotWriter, check_chunk
from snapwake import errors

__all__ = ["MemoryStore"]


class _Writer(SnapshotWriter):
    def __init__(self, store: MemoryStore, m: Manifest) -> None:
        super().__init__(m)
        self.store = store
        self.chunks: dict[int, bytes] = {}

    def write_chunk(self, index: int, data: memoryview) -> None:
        self.check(index, data)
        self.chunks[index] = bytes(data)

    def commit(self) -> None:
        n = len(self.manifest.chunk_sha256)
        missing = [i for i in range(n) if i not in self.chunks]
        if missing:
            raise errors.InvalidArgument(f"data: chunks {missing} never written", field="data")
        with self.store.lock:
            self.store.blobs[self.manifest.snapshot_id] = (self.manifest, [self.chunks[i] for i in range(n)])

    def abort(self) -> None:
        self.chunks.clear()


class MemoryStore(SnapshotStore):
    """Snapshots held in a dict; ``blobs`` is open so tests can damage a chunk on purpose."""

    def __init__(self) -> None:
        super().__init__(workers=2)
        self.lock = threading.Lock()
        self.blobs: dict[str, tuple[Manifest, list[bytes]]] = {}

    def begin(self, m: Manifest) -> SnapshotWriter:
        return _Writer(self, m)

    def manifest(self, sid: str) -> Manifest:
        with self.lock:
            if sid not in self.blobs:
                raise errors.NotFound(f"snapshot {sid} not found")
            return self.blobs[sid][0]

    def list(self) -> list[Manifest]:
        with self.lock:
            return [m for m, _ in self.blobs.values()]

    def read_chunk_into(self, m: Manifest, index: int, dest: memoryview) -> None:
        with self.lock:
            chunks = self.blobs.get(m.snapshot_id, (m, []))[1]
        if index >= len(chunks):
            raise CorruptSnapshot(m.snapshot_id, index, "missing")
        data = chunks[index]
        check_chunk(m, index, data)
        dest[:] = data[:mf.chunk_span(m, index)[1]]

    def delete(self, sid: str) -> bool:
        with self.lock:
            return self.blobs.pop(sid, None) is not None
