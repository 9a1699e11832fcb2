"""Pure parts of the blobstore: ids, stripe layout, manifest checks, cache accounting, stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.blobstore import manifest as mf
from services.blobstore.cache import Allocator, LruPlan, Slot
from services.blobstore.ids import check_snapshot_id, safe_name
from services.blobstore.store.base import CorruptSnapshot
from services.blobstore.store.memory import MemoryStore
from services.blobstore.store.striped import chunk_path, stripe_of
from snapwake import errors


@pytest.mark.parametrize(("sid", "safe"), [
    ("t/ns/fn@3", "t.ns.fn.3"),
    ("default/default/llama-8b@12", "default.default.llama-8b.12"),
    ("a--b/c/d@0", "a--b.c.d.0"),
])
def test_safe_name(sid: str, safe: str) -> None:
    assert safe_name(sid) == safe


@pytest.mark.parametrize(("sid", "problem"), [
    ("t/ns/fn", "expected tenant/namespace/name@revision"),
    ("t/fn@1", "expected tenant/namespace/name@revision"),
    ("t/ns/fn@x", "expected tenant/namespace/name@revision"),
    ("t/../fn@1", "part '..'"),
    ("T/ns/fn@1", "part 'T'"),
    ("t/ns/-fn@1", "part '-fn'"),
    ("t/ns/f.n@1", "part 'f.n'"),
])
def test_bad_snapshot_ids_name_the_field(sid: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        check_snapshot_id(sid)
    assert exc.value.field == "snapshot_id"
    assert problem in exc.value.message


@pytest.mark.parametrize(("index", "n_dirs", "stripe"), [(0, 1, 0), (5, 1, 0), (0, 3, 0), (4, 3, 1), (5, 3, 2), (6, 3, 0)])
def test_stripe_round_robin(index: int, n_dirs: int, stripe: int) -> None:
    assert stripe_of(index, n_dirs) == stripe
    dirs = [Path(f"/d{k}") for k in range(n_dirs)]
    assert chunk_path(dirs, "t.n.f.1", "g", index) == Path(f"/d{stripe}/snapshots/t.n.f.1/g/{index:06d}.chunk")


@pytest.mark.parametrize(("arena", "chunk", "spans"), [
    (10, 4, [(0, 4), (4, 4), (8, 2)]),
    (8, 4, [(0, 4), (4, 4)]),
    (3, 4, [(0, 3)]),
    (0, 4, []),
])
def test_chunk_geometry(arena: int, chunk: int, spans: list[tuple[int, int]]) -> None:
    m = mf.Manifest(snapshot_id="t/n/f@1", arena_bytes=arena, chunk_bytes=chunk)
    assert [mf.chunk_span(m, i) for i in range(mf.chunk_count(arena, chunk))] == spans


def _manifest(data: bytes, chunk: int = 4, sid: str = "t/n/f@1") -> mf.Manifest:
    base = mf.Manifest(snapshot_id=sid, arena_bytes=len(data))
    return mf.fill_checksums(base, memoryview(data), chunk)


@pytest.mark.parametrize(("change", "field"), [
    ({"snapshot_id": "bad"}, "manifest.snapshot_id"),
    ({"snapshot_id": "t/n/g@1"}, "manifest.snapshot_id"),
    ({"chunk_bytes": 0}, "manifest.chunk_bytes"),
    ({"arena_bytes": 20}, "manifest.chunk_sha256"),
])
def test_manifest_validation_names_field(change: dict[str, object], field: str) -> None:
    m = _manifest(b"0123456789")
    for key, value in change.items():
        setattr(m, key, value)
    with pytest.raises(errors.InvalidArgument) as exc:
        mf.validate(m, "t/n/f@1")
    assert exc.value.field == field


def test_manifest_tensor_out_of_arena() -> None:
    m = _manifest(b"0123456789")
    m.tensors.add(name="w", offset=8, nbytes=4)
    with pytest.raises(errors.InvalidArgument, match="'w' ends at 12"):
        mf.validate(m)


def test_fill_checksums_verifies_given_ones() -> None:
    m = _manifest(b"0123456789")
    assert mf.fill_checksums(m, memoryview(b"0123456789"), 4) == m
    with pytest.raises(errors.InvalidArgument, match="chunk 1"):
        mf.fill_checksums(m, memoryview(b"0123X56789"), 4)


def test_digest_is_canonical() -> None:
    a, b = _manifest(b"0123456789"), _manifest(b"0123456789")
    assert mf.digest(a) == mf.digest(mf.from_dict(mf.to_dict(b)))
    assert mf.digest(a) != mf.digest(_manifest(b"0123456780"))


# Allocator: (capacity, ops, expected offsets of allocs, None when it does not fit)
@pytest.mark.parametrize(("ops", "expect"), [
    ([("a", 4096), ("a", 4096), ("a", 8192)], [0, 4096, 8192]),
    ([("a", 1), ("a", 4097)], [0, 4096]),
    ([("a", 16384), ("a", 1)], [0, None]),
    ([("a", 4096), ("a", 4096), ("f", 0), ("a", 8192), ("a", 4096)], [0, 4096, 8192, 0]),
    ([("a", 4096), ("a", 4096), ("f", 0), ("f", 1), ("a", 8192)], [0, 4096, 0]),
])
def test_allocator(ops: list[tuple[str, int]], expect: list[int | None]) -> None:
    alloc, slots, got = Allocator(16384), [], []
    for op, arg in ops:
        if op == "a":
            slot = alloc.alloc(arg)
            got.append(None if slot is None else slot.offset)
            if slot is not None:
                slots.append(slot)
        else:
            alloc.free(slots[arg])
    assert got == expect


# LRU plan over a 4-page budget: (ops, expected evictions per admit, final cached order)
@pytest.mark.parametrize(("ops", "evictions", "order"), [
    ([("admit", "a", 2), ("admit", "b", 2), ("admit", "c", 2)], [[], [], ["a"]], ["b", "c"]),
    ([("admit", "a", 2), ("admit", "b", 2), ("touch", "a"), ("admit", "c", 2)], [[], [], ["b"]], ["a", "c"]),
    ([("admit", "a", 1), ("admit", "b", 1), ("admit", "c", 1), ("admit", "d", 4)], [[], [], [], ["a", "b", "c"]], ["d"]),
    # a referenced snapshot is skipped by eviction
    ([("admit", "a", 2), ("admit", "b", 2), ("acquire", "a"), ("admit", "c", 2)], [[], [], ["b"]], ["a", "c"]),
])
def test_lru_plan(ops: list[tuple], evictions: list[list[str]], order: list[str]) -> None:
    plan, got = LruPlan(4 * 4096), []
    for op, sid, *arg in ops:
        if op == "admit":
            _slot, evicted = plan.admit(sid, arg[0] * 4096)
            plan.release(sid)  # filled
            got.append(evicted)
        elif op == "touch":
            plan.touch(sid)
        else:
            plan.acquire(sid)
    assert got == evictions
    assert list(plan.slots) == order
    assert plan.used == sum(s.size for s in plan.slots.values())


def test_lru_plan_refuses_when_everything_is_in_use() -> None:
    plan = LruPlan(2 * 4096)
    plan.admit("a", 2 * 4096)  # still referenced: being filled
    with pytest.raises(errors.ResourceExhausted, match="needs 4096 bytes"):
        plan.admit("b", 4096)
    with pytest.raises(errors.ResourceExhausted):
        plan.admit("c", 3 * 4096)  # larger than the budget


def test_lru_remove_while_referenced_frees_at_release() -> None:
    plan = LruPlan(2 * 4096)
    plan.admit("a", 2 * 4096)
    assert plan.remove("a") and plan.used == 2 * 4096
    plan.release("a")
    assert plan.used == 0 and plan.alloc.alloc(2 * 4096) == Slot(0, 2 * 4096)


def test_memory_store_round_trip_and_corruption() -> None:
    store, data = MemoryStore(), bytes(range(10))
    m = _manifest(data)
    store.put(m, memoryview(data))
    out = bytearray(10)
    store.read_into(m, memoryview(out))
    assert bytes(out) == data and store.verify("t/n/f@1") == -1
    store.blobs["t/n/f@1"][1][2] = b"\xff\xff"
    assert store.verify("t/n/f@1") == 2
    with pytest.raises(CorruptSnapshot, match="chunk 2") as exc:
        store.read_into(m, memoryview(out))
    assert exc.value.snapshot_id == "t/n/f@1" and exc.value.chunk == 2


def test_writer_rejects_data_that_does_not_match() -> None:
    store, data = MemoryStore(), bytes(range(10))
    writer = store.begin(_manifest(data))
    with pytest.raises(errors.InvalidArgument, match="chunk 0"):
        writer.write_chunk(0, memoryview(b"nope"))
    with pytest.raises(errors.InvalidArgument, match="never written"):
        writer.commit()
    assert not store.contains("t/n/f@1")


def test_lru_a_snapshot_stored_again_while_its_old_copy_is_read() -> None:
    """Found by the handover fuzz suite: a prepare's read of the old copy and a store of a new one
    shared one reference count, so the store's commit raised KeyError (and could free the new slot)."""
    plan = LruPlan(4 * 4096)
    old, _ = plan.admit("a", 4096)
    plan.release("a")  # filled
    plan.acquire("a")  # a load reads the old copy
    assert plan.remove("a")  # a store replaces it...
    new, _ = plan.admit("a", 4096)  # ...and fills a new slot
    plan.release("a", old)  # the load ends: the old slot is freed, the new one kept
    assert plan.used == 4096 and plan.slots["a"] is new
    plan.release("a")  # the store commits
    assert plan.used == 4096 and not plan.refs and not plan.doomed
