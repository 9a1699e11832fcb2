"""The election over FakeEtcd, each scheduler reaching it through its own ``Reach``, which a test
can cut (a partition: calls get no answer and fail at the client's timeout, as ``Etcd``'s do).

The fake's leases only expire when the test moves its clock, so what is shown here is the
leader's own side: cut off, it stops leading by its own clock within the lease TTL, hearing
nothing from etcd, and a successor leads only once etcd expired the lease after that.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from google.protobuf.message import Message

from services.scheduler.election import Election
from snapwake import errors
from snapwake.etcd import Entry, EtcdClient, WatchEvent
from snapwake.etcd_fake import FakeEtcd

pytestmark = pytest.mark.timeout(30)
M = TypeVar("M", bound=Message)
T = TypeVar("T")
TTL_S = 2


class Reach(EtcdClient):
    """One process's way to a shared FakeEtcd. While cut, a call waits ``timeout`` for an answer
    that never comes and raises Unavailable, and an open watch hears nothing."""

    def __init__(self, etcd: FakeEtcd, timeout: float = 1.0) -> None:
        self.etcd, self.timeout = etcd, timeout
        self.open = asyncio.Event()
        self.open.set()

    async def _through(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            await asyncio.wait_for(self.open.wait(), self.timeout)
        except TimeoutError:
            raise errors.Unavailable(f"etcd: no answer within {self.timeout:g}s") from None
        return await call()

    async def get(self, key: str, cls: type[M]) -> Entry | None:
        return await self._through(lambda: self.etcd.get(key, cls))

    async def list_at(self, prefix: str, cls: type[M]) -> tuple[builtins.list[Entry], int]:
        return await self._through(lambda: self.etcd.list_at(prefix, cls))

    async def put(self, key: str, value: Message, lease: int | None = None) -> int:
        return await self._through(lambda: self.etcd.put(key, value, lease))

    async def create(self, key: str, value: Message, lease: int | None = None) -> bool:
        return await self._through(lambda: self.etcd.create(key, value, lease))

    async def swap(self, key: str, value: Message, mod_revision: int, lease: int | None = None) -> bool:
        return await self._through(lambda: self.etcd.swap(key, value, mod_revision, lease))

    async def put_if_unchanged(self, key: str, value: Message, prefix: str, revision: int,
                               create: bool = False) -> bool:
        return await self._through(lambda: self.etcd.put_if_unchanged(key, value, prefix, revision, create))

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        return await self._through(lambda: self.etcd.delete(key, mod_revision))

    async def delete_prefix(self, prefix: str) -> int:
        return await self._through(lambda: self.etcd.delete_prefix(prefix))

    async def watch(self, prefix: str, cls: type[M], start_revision: int | None = None
                    ) -> AsyncGenerator[WatchEvent, None]:
        await self._through(lambda: asyncio.sleep(0))
        async with contextlib.aclosing(self.etcd.watch(prefix, cls, start_revision)) as events:
            async for event in events:
                await self.open.wait()  # cut: the event never arrives
                yield event

    async def grant_lease(self, ttl: int) -> int:
        return await self._through(lambda: self.etcd.grant_lease(ttl))

    async def refresh_lease(self, lease_id: int) -> int:
        return await self._through(lambda: self.etcd.refresh_lease(lease_id))

    async def revoke_lease(self, lease_id: int) -> bool:
        return await self._through(lambda: self.etcd.revoke_lease(lease_id))


async def until(check: Callable[[], bool], what: str, limit_s: float = 5.0) -> float:
    """Waits for ``check``; returns the monotonic time it first held."""
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not true after {limit_s}s"
        await asyncio.sleep(0.01)
    return time.monotonic()


class Scheduler:
    """An election with hooks that note when this scheduler started and stopped leading."""

    def __init__(self, name: str, reach: Reach) -> None:
        self.reach = reach
        self.elected_at: list[float] = []
        self.deposed_at: list[float] = []
        self.election = Election(reach, name, f"{name}:7001", TTL_S, self._elected, self._deposed)
        self.task: asyncio.Task[None] | None = None

    async def _elected(self) -> None:
        self.elected_at.append(time.monotonic())

    async def _deposed(self) -> None:
        self.deposed_at.append(time.monotonic())


@contextlib.asynccontextmanager
async def campaigning(*schedulers: Scheduler) -> AsyncIterator[None]:
    for s in schedulers:
        s.task = asyncio.create_task(s.election.run())
        await asyncio.sleep(0.05)  # the first one wins
    try:
        yield
    finally:
        for s in schedulers:
            assert s.task is not None
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await s.task


async def test_a_leader_cut_off_from_etcd_steps_down_by_its_own_clock_before_a_successor_leads() -> None:
    etcd = FakeEtcd()
    a, b = Scheduler("a", Reach(etcd)), Scheduler("b", Reach(etcd))
    async with campaigning(a, b):
        await until(lambda: a.election.is_leader, "a leads")
        await until(lambda: b.election.leader_address == "a:7001", "b follows a")
        both: list[float] = []

        async def never_two_leaders() -> None:
            while True:
                if a.election.is_leader and b.election.is_leader:
                    both.append(time.monotonic())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(never_two_leaders())
        a.reach.open.clear()  # the partition: a hears nothing from etcd from now on
        cut = time.monotonic()
        stopped = await until(lambda: not a.election.is_leader, "a stops leading", limit_s=TTL_S + 1)
        assert stopped - cut <= TTL_S  # by its own clock, before etcd could expire the lease
        with pytest.raises(errors.Unavailable, match="not the leader"):
            a.election.require()
        await until(lambda: bool(a.deposed_at), "a's on_deposed ran")
        assert not b.election.is_leader  # etcd has not expired a's lease yet: nobody leads

        etcd.advance(TTL_S)  # now etcd does: the leader key goes with the lease
        await until(lambda: b.election.is_leader, "b leads")
        assert a.deposed_at[0] < b.elected_at[0]
        a.reach.open.set()  # the partition heals: a follows b and never leads again
        await until(lambda: a.election.leader_address == "b:7001", "a follows b")
        await asyncio.sleep(0.2)
        sampler.cancel()
        assert both == [] and not a.election.is_leader and len(a.elected_at) == 1


async def test_leadership_ends_at_its_deadline_even_if_the_keeper_is_stuck() -> None:
    """A leader whose refresh loop is gone (a frozen task) still stops leading at its deadline:
    ``_lead`` wakes on the clock, not on the keeper."""
    a = Scheduler("a", Reach(FakeEtcd()))
    async with campaigning(a):
        await until(lambda: a.election.is_leader, "a leads")
        keeper = a.election._keeper
        assert keeper is not None and keeper._task is not None
        keeper._task.cancel()
        began = time.monotonic()
        await until(lambda: bool(a.deposed_at), "a's on_deposed ran", limit_s=TTL_S + 1)
        assert a.deposed_at[0] - began <= TTL_S
        # It gave the lease up on the way out, so it wins again at once, under a new lease.
        await until(lambda: len(a.elected_at) == 2 and a.election.is_leader, "a leads again")
        assert a.election._keeper is not None and a.election._keeper.lease_id != keeper.lease_id
