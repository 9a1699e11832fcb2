"""One behaviour suite for both ``EtcdClient``s: the real ``Etcd`` against a real etcd, and
``FakeEtcd``. Every test runs on both, so the fake the unit tests lean on cannot drift.

Time passes differently: the real etcd's leases run on the wall clock (its minimum TTL is 2 s,
checked every 0.5 s), the fake's on its own clock, which ``elapse`` advances.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from snapwake import errors
from snapwake.etcd import Etcd, EtcdClient, WatchEvent
from snapwake.etcd_fake import FakeEtcd
from snapwake.testing import EtcdCluster, EtcdProcess
from snapwake.v1.types_pb2 import Function, FunctionSpec, FunctionState, Node, Policy

pytestmark = pytest.mark.timeout(60)


@dataclass
class Backend:
    etcd: EtcdClient
    prefix: str  # keys of this test live under it
    elapse: Callable[[float], Awaitable[None]]  # lets lease time pass

    def key(self, name: str) -> str:
        return self.prefix + name


def _fake_elapse(fake: FakeEtcd) -> Callable[[float], Awaitable[None]]:
    async def elapse(seconds: float) -> None:
        fake.advance(seconds)
        await asyncio.sleep(0)
    return elapse


@pytest.fixture(params=["etcd", "fake"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    prefix = f"/behaviour/{uuid.uuid4().hex[:8]}/"
    if request.param == "fake":
        fake = FakeEtcd()
        yield Backend(fake, prefix, _fake_elapse(fake))
        return
    server: EtcdProcess = request.getfixturevalue("etcd_server")
    async with Etcd.connect(server.address, timeout=3) as etcd:
        yield Backend(etcd, prefix, asyncio.sleep)
        await etcd.delete_prefix(prefix)


def function(name: str, concurrency: int = 1) -> Function:
    return Function(id=f"t/d/{name}", revision=3, state=FunctionState.FUNCTION_STATE_READY,
                    spec=FunctionSpec(tenant="t", namespace="d", name=name, env={"A": "1"},
                                      policy=Policy(concurrency=concurrency, queue_timeout=Duration(seconds=7))))


async def take(watch: AsyncIterator[WatchEvent], n: int, limit_s: float = 8.0) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    async with asyncio.timeout(limit_s):
        async for ev in watch:
            got.append(ev)
            if len(got) == n:
                break
    return got


async def test_put_get_round_trip_of_a_protobuf_value(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("fn")
    assert await etcd.get(key, Function) is None
    rev = await etcd.put(key, function("fn", concurrency=4))
    entry = await etcd.get(key, Function)
    assert entry is not None
    assert entry.value == function("fn", concurrency=4)
    assert (entry.key, entry.mod_revision, entry.lease) == (key, rev, 0)
    assert await etcd.put(key, function("fn", concurrency=5)) > rev


async def test_create_only_if_absent(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("once")
    assert await etcd.create(key, function("first"))
    assert not await etcd.create(key, function("second"))
    entry = await etcd.get(key, Function)
    assert entry is not None and entry.value.spec.name == "first"  # type: ignore[attr-defined]


async def test_swap_with_a_stale_revision_fails(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("cas")
    assert await etcd.swap(key, function("v1"), 0)  # 0: only while absent
    assert not await etcd.swap(key, function("again"), 0)
    first = await etcd.get(key, Function)
    assert first is not None
    assert await etcd.swap(key, function("v2"), first.mod_revision)
    assert not await etcd.swap(key, function("v3"), first.mod_revision)  # stale now
    last = await etcd.get(key, Function)
    assert last is not None and last.value.spec.name == "v2" and last.mod_revision > first.mod_revision  # type: ignore[attr-defined]


async def test_put_if_unchanged_holds_only_while_the_prefix_is_as_read(backend: Backend) -> None:
    etcd, group = backend.etcd, backend.key("group/")
    _, empty = await etcd.list_at(group, Function)
    assert await etcd.put_if_unchanged(group + "a", function("a"), group, empty, create=True)  # an empty range holds
    assert not await etcd.put_if_unchanged(group + "b", function("b"), group, empty)  # "a" came after the read
    listed, rev = await etcd.list_at(group, Function)
    assert [e.key for e in listed] == [group + "a"]
    assert not await etcd.put_if_unchanged(group + "a", function("a2"), group, rev, create=True)  # exists
    await etcd.put(backend.key("groupie"), function("outside"))  # a key beside the prefix is no conflict
    assert await etcd.put_if_unchanged(group + "a", function("a2"), group, rev)
    assert not await etcd.put_if_unchanged(group + "c", function("c"), group, rev)  # "a" was rewritten
    _, rev = await etcd.list_at(group, Function)
    assert await etcd.delete(group + "a")
    assert await etcd.put_if_unchanged(group + "c", function("c"), group, rev)  # a delete is not noticed
    got = await etcd.get(group + "c", Function)
    assert got is not None and got.value.spec.name == "c" and got.lease == 0  # type: ignore[attr-defined]


async def test_delete_with_revision(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("del")
    rev = await etcd.put(key, function("x"))
    assert not await etcd.delete(key, rev - 1)
    assert await etcd.get(key, Function) is not None
    assert await etcd.delete(key, rev)
    assert await etcd.get(key, Function) is None
    assert not await etcd.delete(key)
    assert not await etcd.delete(key, rev)
    await etcd.put(key, function("y"))
    assert await etcd.delete(key)


async def test_update_retries_lost_races_and_raises_not_found(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("counter")
    with pytest.raises(errors.NotFound):
        await etcd.update(key, Function, lambda f: f)
    await etcd.put(key, function("c"))
    calls = 0

    def bump(fn: Function) -> Function:
        nonlocal calls
        calls += 1
        fn.revision += 1
        return fn

    # Five read-modify-writes at once: each lost race is retried, no increment is lost.
    await asyncio.gather(*(etcd.update(key, Function, bump) for _ in range(5)))
    entry = await etcd.get(key, Function)
    assert entry is not None and entry.value.revision == 3 + 5  # type: ignore[attr-defined]
    assert calls >= 5
    # mutate returning None writes nothing.
    unchanged = await etcd.update(key, Function, lambda f: None)
    after = await etcd.get(key, Function)
    assert unchanged.revision == 8 and after is not None and after.mod_revision == entry.mod_revision


async def test_update_keeps_the_lease(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("leased")
    lease = await etcd.grant_lease(5)
    await etcd.put(key, Node(name="a"), lease=lease)
    await etcd.update(key, Node, lambda n: Node(name="b"))
    entry = await etcd.get(key, Node)
    assert entry is not None and entry.value.name == "b" and entry.lease == lease  # type: ignore[attr-defined]
    assert await etcd.revoke_lease(lease)
    assert await etcd.get(key, Node) is None


async def test_list_and_list_at_revision(backend: Backend) -> None:
    etcd = backend.etcd
    outside = backend.prefix.rstrip("/") + "-other/x"
    await etcd.put(backend.key("b"), Node(name="b"))
    await etcd.put(outside, Node(name="outside"))
    last = await etcd.put(backend.key("a"), Node(name="a"))
    entries, rev = await etcd.list_at(backend.prefix, Node)
    assert [(e.key, e.value.name) for e in entries] == [(backend.key("a"), "a"), (backend.key("b"), "b")]  # type: ignore[attr-defined]
    assert rev >= last >= max(e.mod_revision for e in entries)
    assert [e.key for e in await etcd.list(backend.prefix, Node)] == [backend.key("a"), backend.key("b")]
    # Watching from the listed revision + 1 sees exactly what came after the list.
    later = await etcd.put(backend.key("c"), Node(name="c"))
    async with contextlib.aclosing(etcd.watch(backend.prefix, Node, start_revision=rev + 1)) as watch:
        (ev,) = await take(watch, 1)
    assert (ev.key, ev.revision, ev.value) == (backend.key("c"), later, Node(name="c"))
    assert await etcd.delete_prefix(outside) == 1


async def test_watch_from_a_revision_sees_puts_and_deletes_in_order(backend: Backend) -> None:
    etcd, a, b = backend.etcd, backend.key("a"), backend.key("b")
    start = await etcd.put(a, Node(name="a1"))
    await etcd.put(b, Node(name="b1"))
    await etcd.delete(a)
    async with contextlib.aclosing(etcd.watch(backend.prefix, Node, start_revision=start)) as watch:
        replayed = await take(watch, 3)
        await etcd.put(a, Node(name="a2"))
        assert await etcd.delete_prefix(backend.prefix) == 2
        live = await take(watch, 3)
    events = replayed + live
    assert [(e.key, e.value.name if e.value else None) for e in events] == [  # type: ignore[attr-defined]
        (a, "a1"), (b, "b1"), (a, None), (a, "a2"), (a, None), (b, None)]
    revisions = [e.revision for e in events]
    assert revisions[0] == start and revisions == sorted(revisions)
    assert revisions[-2] == revisions[-1]  # one prefix delete, one revision


async def test_lease_expiry_deletes_its_keys_and_watchers_see_it(backend: Backend) -> None:
    etcd, key = backend.etcd, backend.key("node")
    lease = await etcd.grant_lease(1)
    assert await etcd.refresh_lease(lease) == 2  # etcd's minimum TTL
    rev = await etcd.put(key, Node(name="n"), lease=lease)
    entry = await etcd.get(key, Node)
    assert entry is not None and entry.lease == lease
    async with contextlib.aclosing(etcd.watch(backend.prefix, Node, start_revision=rev + 1)) as watch:
        waiting = asyncio.ensure_future(take(watch, 1))
        for _ in range(16):
            if await etcd.get(key, Node) is None:
                break
            await backend.elapse(0.5)
        (ev,) = await waiting
    assert await etcd.get(key, Node) is None
    assert (ev.key, ev.value) == (key, None) and ev.revision > rev
    assert await etcd.refresh_lease(lease) == 0
    with pytest.raises(errors.NotFound):
        await etcd.put(key, Node(name="again"), lease=lease)


async def test_revoke_deletes_keys_at_one_revision(backend: Backend) -> None:
    etcd = backend.etcd
    lease = await etcd.grant_lease(10)
    await etcd.put(backend.key("a"), Node(name="a"), lease=lease)
    rev = await etcd.put(backend.key("b"), Node(name="b"), lease=lease)
    await etcd.put(backend.key("c"), Node(name="c"))  # no lease: stays
    assert await etcd.revoke_lease(lease)
    assert [e.key for e in await etcd.list(backend.prefix, Node)] == [backend.key("c")]
    async with contextlib.aclosing(etcd.watch(backend.prefix, Node, start_revision=rev + 2)) as watch:
        deletes = await take(watch, 2)
    assert {e.key for e in deletes} == {backend.key("a"), backend.key("b")}
    assert all(e.value is None for e in deletes) and deletes[0].revision == deletes[1].revision
    assert not await etcd.revoke_lease(lease)
    assert await etcd.refresh_lease(lease) == 0


async def test_unknown_lease(backend: Backend) -> None:
    etcd, unknown = backend.etcd, 0x1234_5678
    assert await etcd.refresh_lease(unknown) == 0
    assert not await etcd.revoke_lease(unknown)
    with pytest.raises(errors.NotFound):
        await etcd.put(backend.key("x"), Node(), lease=unknown)
    with pytest.raises(errors.NotFound):
        await etcd.create(backend.key("x"), Node(), lease=unknown)
    assert await etcd.get(backend.key("x"), Node) is None


@dataclass
class Breakable:
    etcd: EtcdClient
    cut: Callable[[], None]  # makes etcd unreachable


@pytest.fixture(params=["etcd", "fake"])
async def breakable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Breakable]:
    if request.param == "fake":
        fake = FakeEtcd()
        yield Breakable(fake, lambda: setattr(fake, "down", True))
        return
    with EtcdProcess(tmp_path / "etcd") as server:  # its own etcd: this test kills it
        async with Etcd.connect(server.address, timeout=2) as etcd:
            yield Breakable(etcd, server.stop)


async def test_every_call_raises_unavailable_when_etcd_is_unreachable(breakable: Breakable) -> None:
    etcd = breakable.etcd
    lease = await etcd.grant_lease(5)
    rev = await etcd.put("/k", Node(name="k"))
    async with contextlib.aclosing(etcd.watch("/", Node, start_revision=rev)) as watch:
        assert (await anext(watch)).key == "/k"
        breakable.cut()
        began = time.monotonic()
        with pytest.raises(errors.Unavailable):  # an open watch breaks
            await asyncio.wait_for(anext(watch), 10)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: etcd.get("/k", Node), lambda: etcd.list("/", Node), lambda: etcd.list_at("/", Node),
        lambda: etcd.put("/k", Node()), lambda: etcd.create("/n", Node()), lambda: etcd.swap("/k", Node(), rev),
        lambda: etcd.update("/k", Node, lambda n: n), lambda: etcd.delete("/k"), lambda: etcd.delete("/k", rev),
        lambda: etcd.delete_prefix("/"), lambda: etcd.grant_lease(5), lambda: etcd.refresh_lease(lease),
        lambda: etcd.revoke_lease(lease), lambda: anext(etcd.watch("/", Node))]
    for call in calls:
        with pytest.raises(errors.Unavailable):
            await call()
    assert time.monotonic() - began < 30


async def test_connecting_to_a_closed_port_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        with pytest.raises(errors.Unavailable, match=address):
            async with Etcd.connect(address, timeout=1):
                pass


async def test_a_silent_server_is_unavailable_within_the_bound() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # accepts TCP, never speaks HTTP/2
        began = time.monotonic()
        with pytest.raises(errors.Unavailable, match="no answer within 1s"):
            async with Etcd.connect(f"127.0.0.1:{s.getsockname()[1]}", timeout=1):
                pass
        assert time.monotonic() - began < 5


# --- several members (the real client only: the fake is one store) ---------------------------

async def test_one_channel_to_three_members_outlives_one_and_bounds_calls_without_quorum(tmp_path: Path) -> None:
    """Every member through one channel: a killed member costs no call; with two gone (no
    quorum) each call is Unavailable within the client's bound; when they are back, calls work
    again within seconds and a lease granted before lived on."""
    with EtcdCluster(tmp_path / "cluster") as cluster:
        async with Etcd.connect(",".join(cluster.endpoints), timeout=3) as etcd:
            lease = await etcd.grant_lease(30)
            await etcd.put("/k", Node(name="before"), lease=lease)
            cluster.members[0].kill()
            for n in range(10):
                await etcd.put("/k", Node(name=str(n)), lease=lease)
                assert (await etcd.get("/k", Node)) is not None
            cluster.members[1].kill()
            began = time.monotonic()
            with pytest.raises(errors.Unavailable, match="without quorum"):
                await etcd.put("/k", Node(name="lost"))
            assert time.monotonic() - began < 5
            for member in cluster.members[:2]:
                member.spawn()
            began = time.monotonic()
            while True:
                with contextlib.suppress(errors.Unavailable):
                    await etcd.put("/k", Node(name="after"), lease=lease)
                    break
                assert time.monotonic() - began < 20, "no quorum again after 20 s"
            assert await etcd.refresh_lease(lease) > 0
            entry = await etcd.get("/k", Node)
            assert entry is not None and entry.value.name == "after"  # type: ignore[attr-defined]
