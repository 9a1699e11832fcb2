"""GPU handover round trip, across two processes (run on a GPU machine: pytest -m gpu).

This process runs the blobstore with CUDA; a child process plays the model server: it exports a
cuMemCreate allocation filled with a pattern (``store``), then asks for it back (``load``),
imports the fd, copies it to host and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.blobstore.device import cuda_device_count
from services.blobstore.testing import put_snapshot, running_blobstore

pytestmark = pytest.mark.gpu

CHILD = r"""
import ctypes, json, os, socket, sys
from services.blobstore.cache import CacheEntry
from services.blobstore.device import CudaLoader
from snapwake.protocols import recv_message, send_message
from snapwake.v1.blobstore_pb2 import Manifest

path, sid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pattern = bytes((i * 13 + i // 65537) % 256 for i in range(n))
host = (ctypes.c_ubyte * n).from_buffer_copy(pattern)
loader = CudaLoader()
exported = loader.export(CacheEntry(Manifest(snapshot_id=sid, arena_bytes=n), memoryview(host), ctypes.addressof(host)), 0)
out = {}
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(60); s.connect(path)
    send_message(s, {"op": "store", "snapshot_id": sid, "gpu": 0,
                     "manifest": {"snapshot_id": sid, "arena_bytes": n}}, fds=[exported.fd])
    out["store"] = recv_message(s)[0]
exported.release()
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(60); s.connect(path)
    send_message(s, {"op": "load", "snapshot_id": sid, "gpu": 0})
    reply, fds = recv_message(s)
    back = (ctypes.c_ubyte * n)()
    loader.import_into(fds[0], n, 0, memoryview(back), ctypes.addressof(back))
    os.close(fds[0])
    send_message(s, {"op": "mapped"})
    out["load"] = {k: v for k, v in reply.items() if k != "manifest"}
out["equal"] = bytes(back) == pattern
print(json.dumps(out))
"""


LOAD_CHILD = r"""
import ctypes, json, os, socket, sys
from services.blobstore.device import CudaLoader
from snapwake.protocols import recv_message, send_message

path, sid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pattern = bytes((i * 13 + i // 65537) % 256 for i in range(n))
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(60); s.connect(path)
    send_message(s, {"op": "load", "snapshot_id": sid, "gpu": 0})
    reply, fds = recv_message(s)
    back = (ctypes.c_ubyte * n)()
    CudaLoader().import_into(fds[0], n, 0, memoryview(back), ctypes.addressof(back))
    os.close(fds[0])
    send_message(s, {"op": "mapped"})
print(json.dumps({"load": {k: v for k, v in reply.items() if k != "manifest"}, "equal": bytes(back) == pattern}))
"""


def _pattern(n: int) -> bytes:
    return bytes((i * 13 + i // 65537) % 256 for i in range(n))


@pytest.mark.skipif(cuda_device_count() == 0, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("cache_mib", [16, 256])  # not admitted (staging buffers), admitted (its cache slot)
async def test_cuda_load_from_disk_on_a_miss(tmp_path: Path, cache_mib: int) -> None:
    import asyncio

    n, sid = (72 << 20) + 4097, "acme/default/disk@1"  # an unaligned tail
    async with running_blobstore(tmp_path, cache_bytes=cache_mib << 20, chunk_bytes=8 << 20, gpu="true",
                                 staging_buffers=3, disk_readers=4) as app:
        await put_snapshot(app.address, sid, _pattern(n), 8 << 20, message_bytes=1 << 20)  # on disk, not cached
        assert not app.core.cache.contains(sid)
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", LOAD_CHILD, app.cfg.handover_socket, sid, str(n)],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["load"]["ok"] and out["load"]["bytes"] == n and out["equal"]
        assert app.core.stats.disk_bytes == n and app.core.cache.contains(sid) is (cache_mib > 72)


@pytest.mark.skipif(cuda_device_count() == 0, reason="needs an NVIDIA GPU")
async def test_cuda_store_and_load_round_trip(tmp_path: Path) -> None:
    import asyncio

    n = (96 << 20) + 12345  # not a multiple of the allocation granularity
    async with running_blobstore(tmp_path, cache_bytes=256 << 20, chunk_bytes=16 << 20, gpu="true") as app:
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", CHILD, app.cfg.handover_socket, "acme/default/gpu@1", str(n)],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["store"]["ok"] and out["store"]["bytes"] == n
        assert out["load"]["ok"] and out["load"]["bytes"] == n and out["load"]["alloc_bytes"] >= n
        assert out["equal"]
