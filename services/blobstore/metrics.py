"""The blobstore's Prometheus series: cache occupancy and hit rate, DMA bytes and time.

``BlobStats`` is counted by ``Blobstore`` as it works (thread-safe, no Prometheus in the core);
``BlobstoreCollector`` turns it into series at scrape time. DMA throughput is
``rate(snapwake_blobstore_dma_bytes_total) / rate(snapwake_blobstore_dma_seconds_total)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BlobStats", "BlobstoreCollector", "CACHE_BYTES_BUDGET", "CACHE_BYTES_USED", "CACHE_HIT_RATIO",
           "CACHE_HITS", "CACHE_MISSES", "DISK_BYTES", "DISK_SECONDS", "DMA_BYTES", "DMA_SECONDS"]

CACHE_BYTES_USED = "snapwake_blobstore_cache_used_bytes"
CACHE_BYTES_BUDGET = "snapwake_blobstore_cache_budget_bytes"
CACHE_HITS = "snapwake_blobstore_cache_hits"  # exposed with the _total suffix
CACHE_MISSES = "snapwake_blobstore_cache_misses"
CACHE_HIT_RATIO = "snapwake_blobstore_cache_hit_ratio"
DMA_BYTES = "snapwake_blobstore_dma_bytes"
DMA_SECONDS = "snapwake_blobstore_dma_seconds"
DISK_BYTES = "snapwake_blobstore_disk_stream_bytes"
DISK_SECONDS = "snapwake_blobstore_disk_stream_seconds"


@dataclass
class BlobStats:
    """Counters since the process started."""

    hits: int = 0
    misses: int = 0
    dma_bytes: int = 0
    dma_seconds: float = 0.0
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def lookup(self, hit: bool) -> None:
        """One cache lookup for a load or prewarm."""
        with self.lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def dma(self, nbytes: int, seconds: float) -> None:
        """One fill of exportable memory (device DMA, or a memfd copy on CPU hosts)."""
        with self.lock:
            self.dma_bytes += nbytes
            self.dma_seconds += seconds

    def disk(self, nbytes: int, seconds: float) -> None:
        """One miss streamed from disk into exportable memory (included in ``dma`` too)."""
        with self.lock:
            self.disk_bytes += nbytes
            self.disk_seconds += seconds

    def hit_ratio(self) -> float | None:
        """Hits over lookups; None before the first lookup (no number rather than a made-up one)."""
        with self.lock:
            total = self.hits + self.misses
            return self.hits / total if total else None


class BlobstoreCollector(Collector):
    """Reads ``stats`` and ``cache_stats() -> (used, budget)`` at scrape time."""

    def __init__(self, stats: BlobStats, cache_stats: Callable[[], tuple[int, int]]) -> None:
        self.stats, self.cache_stats = stats, cache_stats

    def describe(self) -> list[Metric]:
        return []  # read only at scrape time

    def collect(self) -> Iterator[Metric]:
        used, budget = self.cache_stats()
        yield GaugeMetricFamily(CACHE_BYTES_USED, "Host cache bytes holding snapshots.", value=used)
        yield GaugeMetricFamily(CACHE_BYTES_BUDGET, "Host cache budget in bytes.", value=budget)
        s = self.stats
        with s.lock:
            hits, misses, dma_bytes, dma_seconds = s.hits, s.misses, s.dma_bytes, s.dma_seconds
        yield CounterMetricFamily(CACHE_HITS, "Snapshot lookups served from the host cache.", value=hits)
        yield CounterMetricFamily(CACHE_MISSES, "Snapshot lookups that read disk or a peer.", value=misses)
        ratio = s.hit_ratio()
        if ratio is not None:
            yield GaugeMetricFamily(CACHE_HIT_RATIO, "Cache hits over lookups since start.", value=ratio)
        yield CounterMetricFamily(DMA_BYTES, "Bytes filled into exportable memory for handover.", value=dma_bytes)
        yield CounterMetricFamily(DMA_SECONDS, "Seconds spent filling exportable memory.", value=dma_seconds)
        with s.lock:
            disk_bytes, disk_seconds = s.disk_bytes, s.disk_seconds
        yield CounterMetricFamily(DISK_BYTES, "Bytes streamed from disk into exportable memory on a miss.",
                                  value=disk_bytes)
        yield CounterMetricFamily(DISK_SECONDS, "Seconds spent streaming misses from disk.", value=disk_seconds)
