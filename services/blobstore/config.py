"""Blobstore configuration: read once in ``__main__`` (flags, then SNAPWAKE_* variables)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from snapwake.config import parse_address
from snapwake.protocols import MAX_LINE
from snapwake.tlsconfig import ServerSettings

__all__ = ["BlobstoreConfig"]


@dataclasses.dataclass(frozen=True)
class BlobstoreConfig(ServerSettings):
    """Snapwake blobstore: striped snapshot storage, cache tier and device handover."""

    listen: str = field(default="127.0.0.1:7003", metadata={"help": "gRPC listen address host:port"})
    dirs: tuple[str, ...] = field(default=("./var/blobstore/d0",), metadata={"help": "comma list of stripe directories, one per drive"})
    handover_socket: str = field(default="./var/blobstore/handover.sock", metadata={"help": "the node's handover Unix socket (the nodeagent's; instances get their own)"})
    handover_max_connections: int = field(default=64, metadata={"help": "handover connections served at once on all sockets; more are refused"})
    handover_max_connections_per_instance: int = field(default=4, metadata={"help": "handover connections served at once on one instance's socket"})
    handover_max_message_bytes: int = field(default=8 << 20, metadata={"help": "longest handover request line in bytes"})
    handover_idle_timeout: float = field(default=30.0, metadata={"help": "seconds a handover connection may wait before its next request"})
    handover_request_timeout: float = field(default=10.0, metadata={"help": "seconds a handover request may take to arrive once begun (and a reply to go out)"})
    handover_mapped_timeout: float = field(default=60.0, metadata={"help": "seconds loaded memory is held for the client's 'mapped'"})
    handover_max_loads_per_open: int = field(default=2, metadata={"help": "loads one instance socket serves each time the nodeagent opens it (its start, each restore); more are refused"})
    cache_bytes: int = field(default=1 << 30, metadata={"help": "host-memory cache budget in bytes (pinned once on GPU hosts)"})
    chunk_bytes: int = field(default=64 << 20, metadata={"help": "chunk size for new snapshots (a multiple of 4096 allows O_DIRECT)"})
    staging_buffers: int = field(default=8, metadata={"help": "staging buffers of chunk_bytes each (pinned once on GPU hosts) for snapshots read from disk past the cache"})
    disk_readers: int = field(default=8, metadata={"help": "chunks read from disk at once on a cache miss"})
    max_chunk_bytes: int = field(default=256 << 20, metadata={"help": "largest chunk a PutSnapshot upload or a peer's manifest may declare (each is buffered whole)"})
    peers: tuple[str, ...] = field(default=(), metadata={"help": "comma list of peer blobstores host:port to fetch missing snapshots from"})
    gpu: str = field(default="auto", metadata={"help": "use CUDA: true, false or auto (true when a GPU is visible)"})
    log_level: str = field(default="INFO", metadata={"help": "log level"})
    metrics_port: int = field(default=0, metadata={"help": "port serving Prometheus /metrics (0: off)"})

    def validate(self) -> list[str]:
        """Every problem, each naming its key."""
        problems = self.tls_problems("blobstore")
        for key, value in [("listen", self.listen), *[("peers", p) for p in self.peers]]:
            try:
                parse_address(value)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        if not self.dirs:
            problems.append("dirs: at least one stripe directory is needed")
        if len(set(self.dirs)) != len(self.dirs):
            problems.append(f"dirs: duplicate directories in {','.join(self.dirs)}")
        if self.cache_bytes < 0:
            problems.append(f"cache_bytes: must be >= 0, got {self.cache_bytes}")
        if self.chunk_bytes <= 0:
            problems.append(f"chunk_bytes: must be > 0, got {self.chunk_bytes}")
        if self.staging_buffers <= 0:
            problems.append(f"staging_buffers: must be > 0, got {self.staging_buffers}")
        if self.disk_readers <= 0:
            problems.append(f"disk_readers: must be > 0, got {self.disk_readers}")
        if self.max_chunk_bytes < self.chunk_bytes:
            problems.append(f"max_chunk_bytes: must be >= chunk_bytes ({self.chunk_bytes}), got {self.max_chunk_bytes}")
        if self.gpu.lower() not in ("auto", "true", "false", "1", "0", "yes", "no"):
            problems.append(f"gpu: expected true, false or auto, got {self.gpu!r}")
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"metrics_port: out of range: {self.metrics_port}")
        if not self.handover_socket:
            problems.append("handover_socket: a path is needed")
        for key in ("handover_max_connections", "handover_max_connections_per_instance", "handover_max_message_bytes",
                    "handover_idle_timeout", "handover_request_timeout", "handover_mapped_timeout",
                    "handover_max_loads_per_open"):
            if getattr(self, key) <= 0:
                problems.append(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.handover_max_message_bytes > MAX_LINE:
            problems.append(f"handover_max_message_bytes: at most {MAX_LINE}, got {self.handover_max_message_bytes}")
        return problems
