"""A start from disk through a real blobstore: snapshots larger than its host cache, put over
gRPC, loaded over the node handover socket (memfds; the GPU path shares the reader)."""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from pathlib import Path
from typing import Any

from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.protocols import recv_message, send_message

CHUNK = 64 << 10


def _arena(n: int, seed: int) -> bytes:
    return bytes((i * seed + i // 4099) % 256 for i in range(n))


def _load(path: str, sid: str) -> tuple[dict[str, Any], bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        send_message(sock, {"op": "load", "snapshot_id": sid, "gpu": -1})
        reply, fds = recv_message(sock)
        assert reply["ok"], reply
        (fd,) = fds
        with mmap.mmap(fd, reply["bytes"], prot=mmap.PROT_READ) as mem:
            data = bytes(mem)
        os.close(fd)
        send_message(sock, {"op": "mapped"})
        return reply, data


async def test_more_snapshot_bytes_than_the_cache_holds(tmp_path: Path) -> None:
    small = {f"acme/default/m{k}@1": _arena(3 * CHUNK + 777, seed=k + 3) for k in range(3)}
    big_sid, big = "acme/default/big@1", _arena(9 * CHUNK + 5, seed=13)  # larger than the whole cache
    async with running_blobstore(tmp_path, cache_bytes=8 * CHUNK, staging_buffers=2, disk_readers=3) as app:
        for sid, data in [*small.items(), (big_sid, big)]:
            await put_snapshot(app.address, sid, data, CHUNK)
        sock = app.cfg.handover_socket
        for sid, data in [*small.items(), (big_sid, big), *small.items()]:
            _reply, got = await asyncio.to_thread(_load, sock, sid)
            assert got == data, sid
        stats, (used, budget) = app.core.stats, app.core.cache.stats()
        assert used <= budget == 8 * CHUNK
        assert not app.core.cache.contains(big_sid)  # streamed past the cache
        # Every load missed (two smalls fit at once, and each came back after it was evicted).
        assert stats.hits == 0 and stats.misses == 7 and stats.disk_bytes == 2 * sum(map(len, small.values())) + len(big)
