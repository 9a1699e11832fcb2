"""Snapshots striped round-robin over N directories (one per NVMe drive), parallel direct I/O.

Layout, for stripe directory ``d[k]`` and snapshot directory name ``safe``:

    d[k]/snapshots/{safe}/{generation}/{index:06d}.chunk   chunks with index % N == k
    d[0]/snapshots/{safe}/manifest.json                    {"generation": g, "manifest": {...}}

A write goes into a fresh generation directory nobody points at, and commits by renaming a
temporary manifest over ``manifest.json``: a half-written snapshot is never visible, and a
crash leaves only an unreferenced generation, which start-up removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from services.blobstore import manifest as mf
from services.blobstore.ids import safe_name
from services.blobstore.manifest import Manifest
from services.blobstore.store.base import CorruptSnapshot, SnapshotStore, SnapshotWriter, check_chunk
from snapwake import errors

__all__ = ["ALIGN", "StripedStore", "chunk_path", "stripe_of"]

log = logging.getLogger(__name__)
ALIGN = 4096  # O_DIRECT wants buffer address, length and offset aligned to the logical block
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def stripe_of(index: int, n_dirs: int) -> int:
    """The directory that holds chunk ``index``: round-robin, so reads spread over every drive."""
    return index % n_dirs


def chunk_path(dirs: list[Path], safe: str, generation: str, index: int) -> Path:
    return dirs[stripe_of(index, len(dirs))] / "snapshots" / safe / generation / f"{index:06d}.chunk"


def address(view: memoryview) -> int:
    """The buffer's address, or 1 (never aligned) when it is read-only and ctypes cannot see it."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return 1


def _direct_ok(view: memoryview) -> bool:
    return address(view) % ALIGN == 0 and len(view) % ALIGN == 0


def probe_direct(directory: Path) -> bool:
    """Whether the filesystem under ``directory`` accepts O_DIRECT (tmpfs does not)."""
    if not _O_DIRECT:
        return False
    probe = directory / f".odirect-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | _O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    os.close(fd)
    probe.unlink()
    return True


class _Writer(SnapshotWriter):
    def __init__(self, store: StripedStore, m: Manifest) -> None:
        super().__init__(m)
        self.store, self.safe = store, safe_name(m.snapshot_id)
        self.generation = uuid.uuid4().hex[:12]
        self.written: set[int] = set()
        for d in store.dirs:
            (d / "snapshots" / self.safe / self.generation).mkdir(parents=True, exist_ok=True)

    def write_chunk(self, index: int, data: memoryview) -> None:
        self.check(index, data)
        path = chunk_path(self.store.dirs, self.safe, self.generation, index)
        self.store.write_file(path, data, stripe_of(index, len(self.store.dirs)))
        self.written.add(index)

    def commit(self) -> None:
        missing = sorted(set(range(len(self.manifest.chunk_sha256))) - self.written)
        if missing:
            raise errors.InvalidArgument(f"data: chunks {missing[:5]} never written", field="data")
        self.store.commit(self.safe, self.generation, self.manifest)

    def abort(self) -> None:
        for d in self.store.dirs:
            shutil.rmtree(d / "snapshots" / self.safe / self.generation, ignore_errors=True)


class StripedStore(SnapshotStore):
    """Chunks round-robin over ``dirs``; I/O runs on a thread pool, O_DIRECT where supported."""

    def __init__(self, dirs: list[Path], workers: int | None = None) -> None:
        super().__init__(workers or max(4, 2 * len(dirs)))
        self.dirs = [Path(d) for d in dirs]
        self.lock = threading.Lock()
        for d in self.dirs:
            (d / "snapshots").mkdir(parents=True, exist_ok=True)
        self.direct = [probe_direct(d) for d in self.dirs]
        for d, ok in zip(self.dirs, self.direct, strict=True):
            log.info("stripe %s: %s", d, "O_DIRECT" if ok else "buffered I/O (no O_DIRECT on this filesystem)")
        self._sweep()

    def _manifest_path(self, safe: str) -> Path:
        return self.dirs[0] / "snapshots" / safe / "manifest.json"

    def _record(self, safe: str) -> tuple[str, Manifest] | None:
        try:
            raw = json.loads(self._manifest_path(safe).read_text())
        except FileNotFoundError:
            return None
        return raw["generation"], mf.from_dict(raw["manifest"])

    def begin(self, m: Manifest) -> SnapshotWriter:
        return _Writer(self, m)

    def manifest(self, sid: str) -> Manifest:
        rec = self._record(safe_name(sid))
        if rec is None:
            raise errors.NotFound(f"snapshot {sid} not found")
        return rec[1]

    def list(self) -> list[Manifest]:
        out = []
        for p in sorted((self.dirs[0] / "snapshots").iterdir()):
            rec = self._record(p.name)
            if rec is not None:
                out.append(rec[1])
        return out

    def read_chunk_into(self, m: Manifest, index: int, dest: memoryview) -> None:
        rec = self._record(safe_name(m.snapshot_id))
        if rec is None:
            raise CorruptSnapshot(m.snapshot_id, index, "manifest missing")
        path = chunk_path(self.dirs, safe_name(m.snapshot_id), rec[0], index)
        try:
            got = self.read_file(path, dest, stripe_of(index, len(self.dirs)))
        except FileNotFoundError:
            raise CorruptSnapshot(m.snapshot_id, index, f"missing file {path}") from None
        if got != len(dest):
            raise CorruptSnapshot(m.snapshot_id, index, f"short file ({got} of {len(dest)} bytes)")
        check_chunk(m, index, dest)

    def chunk_reader(self, m: Manifest) -> Callable[[int, memoryview], memoryview]:
        """The miss path's reader (``SnapshotStore.chunk_reader``): the generation is looked up
        once; a chunk is read with O_DIRECT when ``room`` is aligned and holds the chunk rounded
        up to 4096 (the tail of the last one included), else buffered; then verified."""
        safe = safe_name(m.snapshot_id)
        rec = self._record(safe)

        def read(index: int, room: memoryview) -> memoryview:
            length = mf.chunk_span(m, index)[1]
            if rec is None:
                raise CorruptSnapshot(m.snapshot_id, index, "manifest missing")
            stripe = stripe_of(index, len(self.dirs))
            path = chunk_path(self.dirs, safe, rec[0], index)
            want = -(-length // ALIGN) * ALIGN
            direct = self.direct[stripe] and len(room) >= want and address(room) % ALIGN == 0
            try:
                got = self._read_chunk_file(path, room[:want if direct else length], stripe, direct,
                                           length, (m.snapshot_id, index))
            except FileNotFoundError:
                raise CorruptSnapshot(m.snapshot_id, index, f"missing file {path}") from None
            if got != length:
                raise CorruptSnapshot(m.snapshot_id, index, f"short file ({got} of {length} bytes)")
            data = room[:length]
            check_chunk(m, index, data)
            return data
        return read

    def _read_chunk_file(self, path: Path, dest: memoryview, stripe: int, direct: bool, length: int,
                         chunk: tuple[str, int]) -> int:
        """Reads the file at ``path`` into ``dest``; bytes read. A file of another size than
        ``length`` is corrupt (checked before reading). Falls back to buffered I/O, and says so
        once, where the filesystem refuses O_DIRECT."""
        fd = -1
        if direct:
            try:
                fd = os.open(path, os.O_RDONLY | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refused_direct(stripe, exc)
                direct = False
        if fd < 0:
            fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != length:
                raise CorruptSnapshot(*chunk, f"file {path} holds {size} bytes, expected {length}")
            try:
                return _pread_all(fd, dest, direct)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                self._refused_direct(stripe, exc)
        finally:
            os.close(fd)
        return self._read_chunk_file(path, dest[:length], stripe, False, length, chunk)

    def _refused_direct(self, stripe: int, exc: OSError) -> None:
        with self.lock:
            if self.direct[stripe]:
                self.direct[stripe] = False
                log.warning("stripe %s: O_DIRECT refused (%s); reading it with buffered I/O from now on",
                            self.dirs[stripe], exc)

    def delete(self, sid: str) -> bool:
        safe = safe_name(sid)
        with self.lock:
            existed = self._record(safe) is not None
            with contextlib.suppress(FileNotFoundError):
                self._manifest_path(safe).unlink()  # invisible from here on
            for d in self.dirs:
                shutil.rmtree(d / "snapshots" / safe, ignore_errors=True)
        return existed

    def commit(self, safe: str, generation: str, m: Manifest) -> None:
        """Atomically points ``manifest.json`` at ``generation``, then drops the old one."""
        path = self._manifest_path(safe)
        tmp = path.with_name(f"manifest.json.tmp-{generation}")
        body = json.dumps({"generation": generation, "manifest": mf.to_dict(m)}).encode()
        with self.lock:
            old = self._record(safe)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        if old is not None and old[0] != generation:
            for d in self.dirs:
                shutil.rmtree(d / "snapshots" / safe / old[0], ignore_errors=True)
        log.info("stored %s (%d bytes, %d chunks over %d dirs)", m.snapshot_id, m.arena_bytes,
                 len(m.chunk_sha256), len(self.dirs))

    def write_file(self, path: Path, data: memoryview, stripe: int) -> None:
        direct = self.direct[stripe] and _direct_ok(data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (_O_DIRECT if direct else 0), 0o644)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: Path, dest: memoryview, stripe: int) -> int:
        direct = self.direct[stripe] and _direct_ok(dest)
        fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
        try:
            done = 0
            while done < len(dest):
                n = os.preadv(fd, [dest[done:]], done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    def _sweep(self) -> None:
        """Removes generations no manifest points at (left by a crash mid-write)."""
        for d in self.dirs:
            for snap in (d / "snapshots").iterdir():
                if not snap.is_dir():
                    continue
                rec = self._record(snap.name)
                for gen in snap.iterdir():
                    if gen.is_dir() and (rec is None or gen.name != rec[0]):
                        shutil.rmtree(gen, ignore_errors=True)


def _pread_all(fd: int, dest: memoryview, direct: bool) -> int:
    """Reads from offset 0 until ``dest`` is full or the file ends; bytes read."""
    done = 0
    while done < len(dest):
        n = os.preadv(fd, [dest[done:]], done)
        if n == 0:
            break
        done += n
        if direct and done % ALIGN:
            break  # a direct read comes back unaligned only at the end of the file
    return done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
