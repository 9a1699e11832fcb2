"""Wires a configured blobstore together: store, cache, loaders, gRPC server, handover sockets."""

from __future__ import annotations

import logging
from pathlib import Path

from services.blobstore.api import BlobstoreApi
from services.blobstore.cache import HostArena, HostCache
from services.blobstore.config import BlobstoreConfig
from services.blobstore.core import Blobstore
from services.blobstore.device import CudaLoader, MemfdLoader, cuda_device_count, pinned_arena
from services.blobstore.handover import HandoverLimits, HandoverServer
from services.blobstore.metrics import BlobstoreCollector
from services.blobstore.peers import PeerFetcher
from services.blobstore.store.striped import StripedStore
from services.blobstore.stream import StagingPool, Streamer, round_up
from snapwake.grpcserver import GrpcServer
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

__all__ = ["BlobstoreApp"]

log = logging.getLogger(__name__)


def _gpu_count(setting: str) -> int:
    if setting.lower() in ("false", "0", "no"):
        return 0
    count = cuda_device_count()
    if count == 0 and setting.lower() in ("true", "1", "yes"):
        raise RuntimeError("gpu: true, but no CUDA device is visible")
    return count


class BlobstoreApp:
    """One blobstore process's parts; ``start``/``stop`` bracket its life."""

    def __init__(self, cfg: BlobstoreConfig) -> None:
        self.cfg = cfg
        gpus = _gpu_count(cfg.gpu)
        tls = cfg.server_tls()
        # Pinned once here, at start-up: pinning costs ~44 ms/GiB and must never be on the hot path.
        arena = pinned_arena(cfg.cache_bytes) if gpus else HostArena.anonymous(cfg.cache_bytes)
        log.info("cache: %d bytes, %s; %d GPU(s)", cfg.cache_bytes, "pinned" if arena.pinned else "pageable", gpus)
        store = StripedStore([Path(d) for d in cfg.dirs])
        stage = round_up(cfg.chunk_bytes)
        staging = pinned_arena(cfg.staging_buffers * stage) if gpus else HostArena.anonymous(cfg.staging_buffers * stage)
        log.info("miss path: %d readers, %d staging buffers of %d bytes (%s)", cfg.disk_readers, cfg.staging_buffers,
                 stage, "pinned" if staging.pinned else "pageable")
        streamer = Streamer(store, StagingPool(staging, cfg.staging_buffers, stage), cfg.disk_readers)
        self.core = Blobstore(store, HostCache(arena, cfg.cache_bytes),
                              PeerFetcher(cfg.peers, max_chunk_bytes=cfg.max_chunk_bytes, tls=tls.client() if tls else None),
                              MemfdLoader(), CudaLoader() if gpus else None, gpus, cfg.chunk_bytes,
                              max_chunk_bytes=cfg.max_chunk_bytes, streamer=streamer)
        limits = HandoverLimits(
            max_connections=cfg.handover_max_connections,
            max_connections_per_instance=cfg.handover_max_connections_per_instance,
            max_message_bytes=cfg.handover_max_message_bytes, idle_timeout=cfg.handover_idle_timeout,
            request_timeout=cfg.handover_request_timeout, mapped_timeout=cfg.handover_mapped_timeout,
            max_loads_per_open=cfg.handover_max_loads_per_open)
        self.handover = HandoverServer(Path(cfg.handover_socket), self.core, limits)
        name = blobstore_pb2.DESCRIPTOR.services_by_name["BlobstoreService"].full_name
        self.grpc = GrpcServer(cfg.listen, [name], tls=tls, health_bind=cfg.health_listen)
        blobstore_pb2_grpc.add_BlobstoreServiceServicer_to_server(BlobstoreApi(self.core, self.handover),
                                                                  self.grpc.server)

    def collector(self) -> BlobstoreCollector:
        """This blobstore's series; register it with a Prometheus registry."""
        return BlobstoreCollector(self.core.stats, self.core.cache.stats)

    @property
    def address(self) -> str:
        return f"{self.cfg.listen.rpartition(':')[0]}:{self.grpc.port}"

    async def start(self) -> None:
        self.handover.start()
        await self.grpc.start()
        log.info("blobstore serving on %s", self.address)

    async def stop(self, grace: float = 5.0) -> None:
        await self.grpc.stop(grace)
        self.handover.stop()
        self.core.close()
