"""The host-memory cache tier: a byte budget, LRU eviction of whole snapshots, one arena.

The memory is one buffer allocated (and, on GPU hosts, pinned) once at start-up and sliced by
a first-fit allocator: pinning costs about 44 ms per GiB, so it must never happen on the hot
path. ``LruPlan`` is the pure accounting core (unit-tested with tables); ``HostCache`` wraps it
with a lock and the real buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from services.blobstore.manifest import Manifest
from snapwake import errors

__all__ = ["Allocator", "CacheEntry", "HostArena", "HostCache", "LruPlan", "Slot"]


@dataclasses.dataclass(frozen=True)
class Slot:
    offset: int
    size: int  # rounded up to the alignment; the snapshot's bytes are a prefix


class Allocator:
    """First-fit over ``[0, capacity)``; frees coalesce with their neighbours."""

    def __init__(self, capacity: int, align: int = 4096) -> None:
        self.capacity, self.align = capacity, align
        self.free_list: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (offset, size), sorted

    def alloc(self, nbytes: int) -> Slot | None:
        size = max(self.align, -(-nbytes // self.align) * self.align)
        for i, (off, free) in enumerate(self.free_list):
            if free >= size:
                self.free_list[i:i + 1] = [(off + size, free - size)] if free > size else []
                return Slot(off, size)
        return None

    def free(self, slot: Slot) -> None:
        spans = sorted([*self.free_list, (slot.offset, slot.size)])
        merged: list[tuple[int, int]] = []
        for off, size in spans:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self.free_list = merged


class LruPlan:
    """Which snapshots are cached where, in least-recently-used order, with reference counts.

    A referenced snapshot (being filled, DMA'd or streamed) is never evicted; a removal while
    referenced takes effect at the last release.
    """

    def __init__(self, budget: int, align: int = 4096) -> None:
        self.budget = budget
        self.alloc = Allocator(budget, align)
        self.slots: OrderedDict[str, Slot] = OrderedDict()  # oldest first
        self.refs: dict[str, int] = {}  # references to each snapshot's live slot
        # Removed slots still referenced: [sid, slot, references]. A snapshot stored again while
        # its old copy is being read has two slots, and each holder releases the one it holds.
        self.doomed: list[list[Any]] = []

    @property
    def used(self) -> int:
        return sum(s.size for s in self.slots.values()) + sum(d[1].size for d in self.doomed)

    def touch(self, sid: str) -> Slot | None:
        if sid in self.slots:
            self.slots.move_to_end(sid)
            return self.slots[sid]
        return None

    def admit(self, sid: str, nbytes: int) -> tuple[Slot, list[str]]:
        """Places ``sid`` (referenced once), evicting LRU snapshots until it fits. When it cannot
        fit even with every unreferenced snapshot gone, nothing is evicted (ResourceExhausted)."""
        if sid in self.slots:
            raise errors.AlreadyExists(f"snapshot {sid} is already cached")
        trial = Allocator(self.alloc.capacity, self.alloc.align)
        trial.free_list = list(self.alloc.free_list)
        evicted: list[str] = []
        while trial.alloc(nbytes) is None:  # planned on a copy first: a refusal evicts nothing
            victim = next((s for s in self.slots if not self.refs.get(s) and s not in evicted), None)
            if victim is None:
                raise errors.ResourceExhausted(
                    f"cache: {sid} needs {nbytes} bytes; budget {self.budget}, {self.used} in use by "
                    f"snapshots being loaded")
            trial.free(self.slots[victim])
            evicted.append(victim)
        for victim in evicted:
            self.alloc.free(self.slots.pop(victim))
        slot = self.alloc.alloc(nbytes)
        assert slot is not None  # the trial above found room
        self.slots[sid] = slot
        self.refs[sid] = 1
        return slot, evicted

    def acquire(self, sid: str) -> None:
        self.refs[sid] = self.refs.get(sid, 0) + 1

    def release(self, sid: str, slot: Slot | None = None) -> None:
        """Drops a reference to ``slot`` of ``sid`` (None: its live slot, else its removed one)."""
        if (slot is None or slot is self.slots.get(sid)) and self.refs.get(sid):
            self.refs[sid] -= 1
            if self.refs[sid] == 0:
                del self.refs[sid]
            return
        entry = next(d for d in self.doomed if d[0] == sid and (slot is None or d[1] is slot))
        entry[2] -= 1
        if entry[2] == 0:
            self.doomed.remove(entry)
            self.alloc.free(entry[1])

    def remove(self, sid: str) -> bool:
        slot = self.slots.pop(sid, None)
        if slot is None:
            return False
        refs = self.refs.pop(sid, 0)
        if refs:
            self.doomed.append([sid, slot, refs])
        else:
            self.alloc.free(slot)
        return True


class HostArena:
    """One host buffer for the whole cache: pinned on GPU hosts, anonymous mmap elsewhere."""

    def __init__(self, view: memoryview, address: int, pinned: bool, closer: Callable[[], None]) -> None:
        self.view, self.address, self.pinned, self._closer = view, address, pinned, closer

    @classmethod
    def anonymous(cls, capacity: int) -> HostArena:
        buf = mmap.mmap(-1, max(capacity, mmap.PAGESIZE))
        view = memoryview(buf)
        import ctypes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return cls(view[:capacity], addr, False, lambda: None)  # freed with the process

    def close(self) -> None:
        self._closer()


@dataclasses.dataclass
class CacheEntry:
    """A cached snapshot: its manifest and its bytes in the arena (``address`` for DMA)."""

    manifest: Manifest
    view: memoryview
    address: int
    room: memoryview | None = None  # the whole slot (``view`` rounded up to the alignment)


class HostCache:
    """Thread-safe cache of whole snapshots in one ``HostArena``."""

    def __init__(self, arena: HostArena, budget: int, align: int = 4096, admit_fraction: float = 1.0) -> None:
        self.arena, self.plan = arena, LruPlan(budget, align)
        self.admit_fraction = admit_fraction  # the miss path caches no snapshot above this share of the budget
        self.lock = threading.Lock()
        self.manifests: dict[str, Manifest] = {}
        self.ready: set[str] = set()

    def _entry(self, sid: str, slot: Slot) -> CacheEntry:
        m = self.manifests[sid]
        return CacheEntry(m, self.arena.view[slot.offset:slot.offset + m.arena_bytes],
                          self.arena.address + slot.offset, self.arena.view[slot.offset:slot.offset + slot.size])

    @contextlib.contextmanager
    def use(self, sid: str) -> Iterator[CacheEntry | None]:
        """The ready entry for ``sid`` (None on a miss), held against eviction while in use."""
        with self.lock:
            slot = self.plan.touch(sid) if sid in self.ready else None
            if slot is not None:
                self.plan.acquire(sid)
        try:
            yield None if slot is None else self._entry(sid, slot)
        finally:
            if slot is not None:
                with self.lock:
                    self.plan.release(sid, slot)  # the slot it used, though a store may have replaced it

    def reserve(self, m: Manifest) -> tuple[CacheEntry, list[str]]:
        """Room for ``m``, referenced once; call ``commit`` once filled (or ``abandon``)."""
        with self.lock:
            slot, evicted = self.plan.admit(m.snapshot_id, m.arena_bytes)
            for sid in evicted:
                self.manifests.pop(sid, None)
                self.ready.discard(sid)
            self.manifests[m.snapshot_id] = m
            return self._entry(m.snapshot_id, slot), evicted

    def try_reserve(self, m: Manifest) -> tuple[CacheEntry, list[str]] | None:
        """Admission for a snapshot read on a miss: ``reserve``, or None when the cache does not
        take it (more than ``admit_fraction`` of the budget, or no room even with every snapshot
        not in use evicted); it then streams past the cache and nothing is evicted for it."""
        if m.arena_bytes > self.plan.budget * self.admit_fraction:
            return None
        try:
            return self.reserve(m)
        except (errors.ResourceExhausted, errors.AlreadyExists):
            return None

    def commit(self, sid: str, manifest: Manifest | None = None) -> None:
        """Marks a reserved entry filled (``manifest`` replaces one that lacked checksums)."""
        with self.lock:
            if manifest is not None:
                self.manifests[sid] = manifest
            self.ready.add(sid)
            self.plan.release(sid)

    def abandon(self, sid: str) -> None:
        with self.lock:
            self.plan.remove(sid)
            self.plan.release(sid)
            self.manifests.pop(sid, None)

    def remove(self, sid: str) -> bool:
        with self.lock:
            self.ready.discard(sid)
            self.manifests.pop(sid, None)
            return self.plan.remove(sid)

    def contains(self, sid: str) -> bool:
        with self.lock:
            return sid in self.ready

    def stats(self) -> tuple[int, int]:
        """(bytes used, budget)."""
        with self.lock:
            return self.plan.used, self.plan.budget
