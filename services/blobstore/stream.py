"""The cache-miss path: a snapshot's chunks streamed from disk straight into exportable memory.

A snapshot that is not in the host cache is not read whole into the cache before its DMA any
more. Its chunks are read in parallel (a bounded pool of ``workers`` threads), with O_DIRECT
where the filesystem allows, into page-aligned buffers that are pinned on GPU hosts; each chunk
is checked against its sha256 and handed to a ``Sink`` (a DMA into the GPU allocation, or a copy
into a memfd on hosts without a GPU) as soon as it is in, so the disk, the hashing and the DMA
overlap and the load takes about ``bytes / disk bandwidth``.

The buffers are either the snapshot's own slot in the host cache (admitted: the cache is filled
on the way, and the next start is a hit) or, when the cache does not admit it, a ring of
``StagingPool`` buffers reused chunk after chunk. The staging memory is allocated (and pinned)
once at start-up, like the cache: pinning costs ~44 ms/GiB and must never be on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from services.blobstore import manifest as mf
from services.blobstore.cache import HostArena
from services.blobstore.manifest import Manifest
from services.blobstore.store.base import CorruptSnapshot, SnapshotStore
from services.blobstore.store.striped import ALIGN

__all__ = ["Sink", "StagingPool", "StreamResult", "Streamer", "round_up"]

log = logging.getLogger(__name__)

Sink = Callable[[int, memoryview, int], None]
"""``sink(offset, data, address)``: one verified chunk of the arena at ``offset``; ``address``
is where ``data`` lives in host memory (pinned on GPU hosts: a DMA source). It returns only once
it no longer needs ``data`` (the buffer is reused right after)."""

Room = tuple[memoryview, int]
"""A host buffer and its address: where a chunk is read (at least the chunk, rounded up to 4096)."""


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class StagingPool:
    """``count`` page-aligned buffers of ``size`` bytes carved from one arena; ``take`` blocks
    until one is free, so at most ``count`` chunks are in staging at once."""

    def __init__(self, arena: HostArena, count: int, size: int) -> None:
        if count <= 0 or size <= 0 or size % ALIGN:
            raise ValueError(f"staging: need count > 0 and size a positive multiple of {ALIGN}, got {count} x {size}")
        if len(arena.view) < count * size:
            raise ValueError(f"staging: arena of {len(arena.view)} bytes cannot hold {count} x {size}")
        self.arena, self.count, self.size = arena, count, size
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(count):
            self._free.put(k)

    @contextlib.contextmanager
    def take(self) -> Iterator[Room]:
        k = self._free.get()
        try:
            yield self.arena.view[k * self.size:(k + 1) * self.size], self.arena.address + k * self.size
        finally:
            self._free.put(k)

    def close(self) -> None:
        self.arena.close()


@dataclass(frozen=True)
class StreamResult:
    nbytes: int
    seconds: float
    chunks: int
    max_in_flight: int  # chunks being read, checked or sunk at once (never above the workers)


class Streamer:
    """Reads snapshots from ``store`` chunk by chunk into a ``Sink``, ``workers`` chunks at a time."""

    def __init__(self, store: SnapshotStore, staging: StagingPool, workers: int = 8) -> None:
        if workers <= 0:
            raise ValueError(f"workers: must be > 0, got {workers}")
        self.store, self.staging, self.workers = store, staging, workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blob-stream")
        self._lock = threading.Lock()
        self._in_flight = 0

    def can_stage(self, m: Manifest) -> bool:
        """Whether a chunk of ``m`` fits a staging buffer (a bigger one needs a cache slot)."""
        return round_up(max(m.chunk_bytes, 1)) <= self.staging.size

    def stream(self, m: Manifest, sink: Sink, into: Room | None = None) -> StreamResult:
        """Every chunk of ``m``, verified, into ``sink``; read into ``into`` (the snapshot's cache
        slot, at least ``arena_bytes`` rounded up to 4096) when given, else through staging.

        Raises the first error (a ``CorruptSnapshot`` of the lowest chunk first) once no chunk is
        in flight any more, so the caller may free what ``sink`` writes to right away.
        """
        n = mf.chunk_count(m.arena_bytes, m.chunk_bytes)
        if into is None and n and not self.can_stage(m):
            raise ValueError(f"stream: chunks of {m.chunk_bytes} bytes do not fit staging buffers of {self.staging.size}")
        if into is not None and len(into[0]) < round_up(m.arena_bytes):
            raise ValueError(f"stream: a slot of {len(into[0])} bytes cannot hold {m.arena_bytes}")
        read = self.store.chunk_reader(m)
        failed = threading.Event()
        peak = [0]
        t0 = time.perf_counter()

        def one(index: int) -> None:
            if failed.is_set():
                return
            start, length = mf.chunk_span(m, index)
            with self._lock:
                self._in_flight += 1
                peak[0] = max(peak[0], self._in_flight)
            try:
                if into is not None:
                    # The slot's room up to the next 4096 boundary is ours: the tail reads direct too.
                    end = min(len(into[0]), start + round_up(length))
                    data = read(index, into[0][start:end])
                    sink(start, data, into[1] + start)
                else:
                    with self.staging.take() as (buf, addr):
                        data = read(index, buf)
                        sink(start, data, addr)
            except BaseException:
                failed.set()
                raise
            finally:
                with self._lock:
                    self._in_flight -= 1

        futures: list[Future[None]] = [self.pool.submit(one, i) for i in range(n)]
        wait(futures)
        bad = [e for f in futures if (e := f.exception()) is not None]
        if bad:
            corrupt = sorted((e for e in bad if isinstance(e, CorruptSnapshot)), key=lambda e: e.chunk)
            raise (corrupt or bad)[0]
        return StreamResult(m.arena_bytes, time.perf_counter() - t0, n, peak[0])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
