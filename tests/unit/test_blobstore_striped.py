"""StripedStore on real directories: layout, atomic commit, checksums, direct I/O detection."""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import pytest

from services.blobstore import manifest as mf
from services.blobstore.store.base import CorruptSnapshot
from services.blobstore.store.striped import StripedStore, probe_direct

SID = "t/n/f@1"
CHUNK = 8192  # a multiple of 4096, so whole chunks use O_DIRECT where the filesystem allows


def _data(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def _put(store: StripedStore, data: bytes, sid: str = SID) -> mf.Manifest:
    m = mf.fill_checksums(mf.Manifest(snapshot_id=sid, arena_bytes=len(data)), memoryview(data), CHUNK)
    store.put(m, memoryview(data))
    return m


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    return [tmp_path / f"d{k}" for k in range(3)]


def test_chunks_are_striped_round_robin(dirs: list[Path]) -> None:
    store = StripedStore(dirs)
    m = _put(store, _data(7 * CHUNK + 100))
    counts = [len(list(d.glob("snapshots/t.n.f.1/*/*.chunk"))) for d in dirs]
    assert counts == [3, 3, 2]
    assert store.list() == [m] and store.manifest(SID) == m
    out = mmap.mmap(-1, 8 * CHUNK)  # page-aligned, as the cache arena is
    store.read_into(m, memoryview(out)[:m.arena_bytes])
    assert out[:m.arena_bytes] == _data(7 * CHUNK + 100)


@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("chunk", [CHUNK, 1000])  # 1000: unaligned, so every chunk takes buffered I/O
def test_round_trip_direct_or_buffered(tmp_path: Path, where: str, chunk: int) -> None:
    if where == "shm" and not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    root = tmp_path if where == "tmp" else Path("/dev/shm") / tmp_path.name
    try:
        store = StripedStore([root / "a", root / "b"])
        assert store.direct == [probe_direct(root / "a")] * 2  # detected once per directory
        data = _data(5 * chunk + 17)
        m = mf.fill_checksums(mf.Manifest(snapshot_id=SID, arena_bytes=len(data)), memoryview(data), chunk)
        store.put(m, memoryview(data))
        out = mmap.mmap(-1, len(data) + CHUNK)
        store.read_into(m, memoryview(out)[:len(data)])
        assert out[:len(data)] == data
    finally:
        if where == "shm":
            shutil.rmtree(root, ignore_errors=True)


def test_uncommitted_write_is_invisible_and_swept(dirs: list[Path]) -> None:
    store = StripedStore(dirs)
    data = _data(3 * CHUNK)
    m = mf.fill_checksums(mf.Manifest(snapshot_id=SID, arena_bytes=len(data)), memoryview(data), CHUNK)
    writer = store.begin(m)
    writer.write_chunk(0, memoryview(data)[:CHUNK])
    assert not store.contains(SID) and store.list() == []
    # a crash here leaves a generation directory nobody points at; a restart removes it
    StripedStore(dirs)
    assert list(dirs[0].glob("snapshots/t.n.f.1/*")) == []


def test_overwrite_replaces_generation(dirs: list[Path]) -> None:
    store = StripedStore(dirs)
    _put(store, _data(2 * CHUNK))
    m2 = _put(store, _data(CHUNK + 5)[::-1])
    assert store.manifest(SID) == m2
    assert len([p for p in dirs[0].glob("snapshots/t.n.f.1/*") if p.is_dir()]) == 1
    assert store.delete(SID) and not store.contains(SID) and not store.delete(SID)


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_damaged_chunk_raises_corrupt(dirs: list[Path], damage: str) -> None:
    store = StripedStore(dirs)
    m = _put(store, _data(4 * CHUNK))
    victim = next(dirs[1].glob("snapshots/t.n.f.1/*/000001.chunk"))
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[100] ^= 0xFF
        victim.write_bytes(raw)
    elif damage == "truncate":
        os.truncate(victim, 10)
    else:
        victim.unlink()
    assert store.verify(SID) == 1
    with pytest.raises(CorruptSnapshot, match=r"snapshot t/n/f@1 is corrupt: chunk 1"):
        store.read_into(m, memoryview(bytearray(m.arena_bytes)))
