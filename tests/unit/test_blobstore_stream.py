"""The cache-miss path (services/blobstore/stream.py): a snapshot streamed from a real StripedStore
into exportable memory (memfds here; the same reader feeds the GPU), and the host cache as a tier
with admission and LRU eviction under a budget smaller than the snapshots on disk."""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from services.blobstore import manifest as mf
from services.blobstore.cache import HostArena, HostCache, LruPlan
from services.blobstore.core import Blobstore
from services.blobstore.device import Exported, MemfdLoader
from services.blobstore.peers import PeerFetcher
from services.blobstore.store.base import CorruptSnapshot
from services.blobstore.store.striped import StripedStore, chunk_path
from services.blobstore.stream import StagingPool, Streamer
from snapwake import errors

CHUNK = 16384  # a multiple of 4096: whole chunks go O_DIRECT where the filesystem allows it


def _data(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 17 + i // 253) % 256 for i in range(n))


def _sid(k: int) -> str:
    return f"t/n/f{k}@1"


def _put(store: StripedStore, data: bytes, sid: str) -> mf.Manifest:
    m = mf.fill_checksums(mf.Manifest(snapshot_id=sid, arena_bytes=len(data)), memoryview(data), CHUNK)
    store.put(m, memoryview(data))
    return m


def _read_back(exported: Exported) -> bytes:
    try:
        if not exported.nbytes:
            return b""
        with mmap.mmap(exported.fd, exported.nbytes, prot=mmap.PROT_READ) as mm:
            return bytes(mm)
    finally:
        exported.release()


def _streamer(store: StripedStore, buffers: int = 2, workers: int = 4) -> Streamer:
    return Streamer(store, StagingPool(HostArena.anonymous(buffers * CHUNK), buffers, CHUNK), workers)


def _core(store: StripedStore, cache_bytes: int, **kw: int) -> Blobstore:
    cache = HostCache(HostArena.anonymous(cache_bytes), cache_bytes)
    return Blobstore(store, cache, PeerFetcher(()), MemfdLoader(), chunk_bytes=CHUNK, streamer=_streamer(store, **kw))


@pytest.fixture
def store(tmp_path: Path) -> StripedStore:
    return StripedStore([tmp_path / "d0", tmp_path / "d1"], workers=2)


@pytest.mark.parametrize("size", [5 * CHUNK + 1234, 3 * CHUNK, 100])  # an unaligned tail, none, a lone short chunk
def test_streamed_bytes_match_the_buffered_path(store: StripedStore, size: int,
                                                caplog: pytest.LogCaptureFixture) -> None:
    data = _data(size)
    m = _put(store, data, _sid(1))
    buffered = bytearray(size)
    store.read_into(m, memoryview(buffered))  # today's path: verified chunk reads into the cache
    streamer = _streamer(store)
    out = bytearray(size)

    def sink(offset: int, chunk: memoryview, _address: int) -> None:
        out[offset:offset + len(chunk)] = chunk
    with caplog.at_level(logging.WARNING):
        result = streamer.stream(m, sink)
    assert bytes(out) == bytes(buffered) == data
    assert result.nbytes == size and result.chunks == mf.chunk_count(size, CHUNK)
    # This filesystem takes O_DIRECT (ext4 here), and the unaligned tail did not knock it off.
    assert "O_DIRECT refused" not in caplog.text
    assert store.direct == [True, True] or "buffered" in caplog.text


def test_stream_into_a_cache_slot_reads_the_tail_direct(store: StripedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    if store.direct != [True, True]:
        pytest.skip("this filesystem refuses O_DIRECT")
    data = _data(2 * CHUNK + 4097)
    m = _put(store, data, _sid(1))
    cache = HostCache(HostArena.anonymous(1 << 20), 1 << 20)
    entry, _ = cache.reserve(m)
    assert entry.room is not None and len(entry.room) == 2 * CHUNK + 2 * 4096  # the slot, rounded up
    real_open, flags_seen = os.open, []

    def recording_open(path: object, flags: int, *args: int) -> int:
        if str(path).endswith(".chunk"):
            flags_seen.append(flags)
        return real_open(path, flags, *args)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "open", recording_open)
    seen: list[int] = []
    _streamer(store).stream(m, lambda off, chunk, _a: seen.append(off), (entry.room, entry.address))
    assert sorted(seen) == [0, CHUNK, 2 * CHUNK] and bytes(entry.view) == data
    assert len(flags_seen) == 3 and all(f & os.O_DIRECT for f in flags_seen)  # the 4097-byte tail too


def test_o_direct_refused_falls_back_to_buffered_and_says_so(store: StripedStore, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    data = _data(3 * CHUNK + 10)
    m = _put(store, data, _sid(1))
    store.direct = [True, True]  # as if the probe had passed, but the filesystem refuses (tmpfs, old kernels)
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "open", refusing_open)
    out = bytearray(len(data))
    with caplog.at_level(logging.WARNING):
        _streamer(store).stream(m, lambda off, chunk, _a: out.__setitem__(slice(off, off + len(chunk)), chunk))
    assert bytes(out) == data
    assert store.direct == [False, False] and caplog.text.count("O_DIRECT refused") == 2  # once per stripe


@pytest.mark.parametrize(("damage", "problem"), [
    ("delete", "chunk 3: missing file"),
    ("flip", "chunk 3: sha256 mismatch"),
    ("truncate", "chunk 3: file .* holds 100 bytes, expected 16384"),
])
def test_a_missing_or_corrupt_stripe_is_a_clear_error(store: StripedStore, damage: str, problem: str) -> None:
    m = _put(store, _data(6 * CHUNK), _sid(1))
    generation = json.loads((store.dirs[0] / "snapshots" / "t.n.f1.1" / "manifest.json").read_text())["generation"]
    path = chunk_path(store.dirs, "t.n.f1.1", generation, 3)
    if damage == "delete":
        path.unlink()
    elif damage == "flip":
        blob = bytearray(path.read_bytes())
        blob[5] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(b"x" * 100)
    with pytest.raises(CorruptSnapshot, match=problem) as exc:
        _streamer(store).stream(m, lambda *_: None)
    assert exc.value.chunk == 3 and exc.value.snapshot_id == _sid(1)
    # Through the blobstore: the miss path hands over to the cache path, which drops the copy and
    # finds no peer to refetch it from; nothing corrupt is ever served.
    core = _core(store, 1 << 20)
    with pytest.raises(CorruptSnapshot, match="chunk 3: checksum failed; local copy dropped and no good copy"):
        core.load(_sid(1), -1)
    assert not core.cache.contains(_sid(1)) and not store.contains(_sid(1))


def test_parallelism_is_bounded_by_workers_and_staging(store: StripedStore) -> None:
    m = _put(store, _data(12 * CHUNK), _sid(1))
    lock, busy, peak = threading.Lock(), [0], [0]

    def slow_sink(_off: int, _chunk: memoryview, _addr: int) -> None:
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.01)
        with lock:
            busy[0] -= 1
    result = _streamer(store, buffers=8, workers=3).stream(m, slow_sink)
    assert 2 <= result.max_in_flight <= 3 and 2 <= peak[0] <= 3  # parallel, and never above the workers
    peak[0] = 0
    _streamer(store, buffers=2, workers=6).stream(m, slow_sink)
    assert peak[0] == 2  # six readers, but only two staging buffers to hold chunks


def test_a_chunk_bigger_than_staging_is_refused_by_the_streamer(store: StripedStore) -> None:
    data = _data(3 * CHUNK)
    m = mf.fill_checksums(mf.Manifest(snapshot_id=_sid(1), arena_bytes=len(data)), memoryview(data), 2 * CHUNK)
    store.put(m, memoryview(data))
    streamer = _streamer(store)
    assert not streamer.can_stage(m)
    with pytest.raises(ValueError, match="do not fit staging buffers"):
        streamer.stream(m, lambda *_: None)


def test_the_cache_is_a_tier_lru_admission_and_eviction(store: StripedStore) -> None:
    """Five snapshots of 3 chunks on disk, a cache for two: each miss streams from disk and is
    admitted, evicting the least recently used one not in use; one in use is never evicted, and a
    snapshot larger than the cache streams past it."""
    size = 3 * CHUNK
    datas = {k: _data(size, seed=k) for k in range(5)}
    for k, d in datas.items():
        _put(store, d, _sid(k))
    big = _data(7 * CHUNK + 5, seed=9)
    _put(store, big, _sid(9))
    core = _core(store, 2 * size)

    def load(k: int) -> bytes:
        return _read_back(core.load(_sid(k), -1))
    assert load(0) == datas[0] and load(1) == datas[1]
    assert core.cache.contains(_sid(0)) and core.cache.contains(_sid(1)) and core.stats.misses == 2
    assert load(0) == datas[0] and core.stats.hits == 1  # a hit: 0 is now the most recent
    assert load(2) == datas[2]  # evicts 1, the least recently used
    assert [core.cache.contains(_sid(k)) for k in range(3)] == [True, False, True]
    assert core.stats.disk_bytes == 3 * size
    with core.cache.use(_sid(0)) as held:  # 0 is being DMA'd elsewhere: pinned against eviction
        assert held is not None
        assert load(3) == datas[3]  # 2 goes, not 0
        assert load(4) == datas[4]  # 3 goes; 0 still held
        assert [core.cache.contains(_sid(k)) for k in range(5)] == [True, False, False, False, True]
        assert load(9) == big  # larger than the whole cache: streamed past it, nothing evicted
        assert core.cache.contains(_sid(0)) and core.cache.contains(_sid(4)) and not core.cache.contains(_sid(9))
        assert held.view == datas[0]
    used, budget = core.cache.stats()
    assert used <= budget == 2 * size


def test_a_refused_admission_evicts_nothing() -> None:
    plan = LruPlan(4 * 4096)
    plan.admit("a", 2 * 4096)
    plan.release("a")
    plan.admit("b", 2 * 4096)  # still referenced: being filled
    with pytest.raises(errors.ResourceExhausted):
        plan.admit("c", 4 * 4096)  # would need b too
    assert list(plan.slots) == ["a", "b"] and plan.used == 4 * 4096
    cache = HostCache(HostArena.anonymous(4 * 4096), 4 * 4096, admit_fraction=0.5)
    assert cache.try_reserve(mf.Manifest(snapshot_id=_sid(1), arena_bytes=3 * 4096)) is None  # over half
    assert cache.try_reserve(mf.Manifest(snapshot_id=_sid(2), arena_bytes=2 * 4096)) is not None


def test_prewarm_of_a_snapshot_the_cache_does_not_admit_verifies_it_on_disk(store: StripedStore) -> None:
    data = _data(6 * CHUNK + 99)
    _put(store, data, _sid(1))
    core = _core(store, 2 * CHUNK)
    r = core.prewarm(_sid(1))
    assert not r.was_cached and r.nbytes == len(data) and not core.cache.contains(_sid(1))
    assert _read_back(core.load(_sid(1), -1)) == data  # the start streams it
    generation = json.loads((store.dirs[0] / "snapshots" / "t.n.f1.1" / "manifest.json").read_text())["generation"]
    path = chunk_path(store.dirs, "t.n.f1.1", generation, 5)
    path.write_bytes(b"\0" * CHUNK)
    with pytest.raises(CorruptSnapshot, match="chunk 5: checksum failed; local copy dropped"):
        core.prewarm(_sid(1))
    assert not store.contains(_sid(1))


class _FakeDriver:
    """Just enough of ``cuda.bindings.driver`` for ``CudaLoader.export_stream``: device memory is
    a host buffer, a copy is a memmove; every call is recorded."""

    BASE = 1 << 40

    class _Enum:
        def __getattr__(self, name: str) -> str:
            return name

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.device = bytearray()
        self.lock = threading.Lock()
        for enum in ("CUmemAllocationType", "CUmemLocationType", "CUmemAllocationHandleType", "CUmemAccess_flags",
                     "CUmemAllocationGranularity_flags", "CUstream_flags"):
            setattr(self, enum, self._Enum())

    def __getattr__(self, name: str) -> object:
        def call(*args: object) -> tuple[int, ...]:
            with self.lock:
                self.calls.append(name)
            return (0, 1)
        return call

    def CUmemAllocationProp(self) -> object:  # noqa: N802 - the binding's name
        class Loc:
            type = id = None

        class Prop:
            location = Loc()
            type = requestedHandleTypes = None
        return Prop()

    def CUmemAccessDesc(self) -> object:  # noqa: N802
        return type("Desc", (), {})()

    def cuMemGetAllocationGranularity(self, *_: object) -> tuple[int, int]:  # noqa: N802
        return 0, 2 << 20

    def cuMemCreate(self, size: int, *_: object) -> tuple[int, str]:  # noqa: N802
        self.device = bytearray(size)
        self.calls.append("cuMemCreate")
        return 0, "handle"

    def cuMemAddressReserve(self, *_: object) -> tuple[int, int]:  # noqa: N802
        return 0, self.BASE

    def cuMemcpyHtoDAsync(self, dst: int, src: int, n: int, _stream: object) -> tuple[int]:  # noqa: N802
        import ctypes
        buf = (ctypes.c_char * len(self.device)).from_buffer(self.device)
        ctypes.memmove(ctypes.addressof(buf) + dst - self.BASE, src, n)
        with self.lock:
            self.calls.append("cuMemcpyHtoDAsync")
        return (0,)

    def cuMemExportToShareableHandle(self, *_: object) -> tuple[int, int]:  # noqa: N802
        self.calls.append("cuMemExportToShareableHandle")
        return 0, os.memfd_create("fake-export")


def test_cuda_loader_streams_chunks_into_device_memory(store: StripedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.blobstore import device

    fake = _FakeDriver()
    monkeypatch.setattr(device, "driver", lambda: fake)
    data = _data(5 * CHUNK + 321)
    m = _put(store, data, _sid(1))
    exported = device.CudaLoader().export_stream(len(data), 0, lambda sink: _streamer(store).stream(m, sink))
    assert bytes(fake.device[:len(data)]) == data and exported.nbytes == len(data)
    assert exported.alloc_bytes == 2 << 20 and fake.calls.count("cuMemcpyHtoDAsync") == 6
    exported.release()
    assert fake.calls[-1] == "cuMemRelease"
    # A corrupt chunk: the memory is freed and nothing is exported.
    path = next((store.dirs[1] / "snapshots" / "t.n.f1.1").glob("*/000001.chunk"))
    path.write_bytes(b"\0" * CHUNK)
    fake.calls.clear()
    with pytest.raises(CorruptSnapshot, match="chunk 1"):
        device.CudaLoader().export_stream(len(data), 0, lambda sink: _streamer(store).stream(m, sink))
    assert "cuMemRelease" in fake.calls and "cuMemExportToShareableHandle" not in fake.calls
