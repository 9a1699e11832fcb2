"""Leader election through an etcd lease on ``keys.LEADER``.

A candidate takes a lease and creates the key under it only if absent. The winner leads while
its lease lives (``LeaseKeeper`` refreshes it); the others watch the key and campaign again
when it is deleted or expires. The value is a ``Node`` message whose ``name`` is the
scheduler's id and ``address`` its advertised gRPC address, so callers can find the leader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from snapwake import errors, keys
from snapwake.etcd import EtcdClient, LeaseKeeper
from snapwake.v1.types_pb2 import Node

__all__ = ["Election"]

log = logging.getLogger(__name__)
Hook = Callable[[], Awaitable[None]]


class Election:
    """Campaigns forever; ``on_elected``/``on_deposed`` run as leadership changes."""

    def __init__(self, etcd: EtcdClient, ident: str, address: str, ttl_s: int, on_elected: Hook, on_deposed: Hook
                 ) -> None:
        self.etcd, self.ident, self.address, self.ttl_s = etcd, ident, address, ttl_s
        self.on_elected, self.on_deposed = on_elected, on_deposed
        self.is_leader = False
        self.leader_address = ""
        self._keeper: LeaseKeeper | None = None
        self._lost = asyncio.Event()

    def require(self) -> None:
        """Raises ``Unavailable`` naming the leader unless this process leads."""
        if not self.is_leader:
            where = self.leader_address or "unknown (election in progress)"
            raise errors.Unavailable(f"not the leader; leader is at {where}")

    async def run(self) -> None:
        while True:
            try:
                if await self._campaign():
                    await self._lead()
                else:
                    await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: step down, back off, try again
                log.warning("election round failed: %s", exc)
                await self._step_down()
                await asyncio.sleep(1.0)

    async def _campaign(self) -> bool:
        self._lost = asyncio.Event()
        keeper = LeaseKeeper(self.etcd, self.ttl_s, on_lost=self._on_lease_lost)
        lease = await keeper.start()
        if await self.etcd.create(keys.LEADER, Node(name=self.ident, address=self.address), lease=lease):
            self._keeper = keeper
            return True
        await keeper.stop(revoke=True)
        return False

    async def _on_lease_lost(self) -> None:
        self._lost.set()

    async def _lead(self) -> None:
        log.info("elected leader as %s at %s", self.ident, self.address)
        self.is_leader, self.leader_address = True, self.address
        await self.on_elected()
        await self._lost.wait()
        log.warning("leader lease lost; stepping down")
        await self._step_down()

    async def _step_down(self) -> None:
        was_leader, self.is_leader = self.is_leader, False
        if self._keeper is not None:
            await self._keeper.stop(revoke=True)
            self._keeper = None
        if was_leader:
            await self.on_deposed()

    async def _follow(self) -> None:
        entry = await self.etcd.get(keys.LEADER, Node)
        if entry is None:
            return
        self.leader_address = entry.value.address  # type: ignore[attr-defined]
        log.info("following leader at %s", self.leader_address)
        async for ev in self.etcd.watch(keys.LEADER, Node, start_revision=entry.mod_revision + 1):
            if ev.key != keys.LEADER:
                continue
            if ev.value is None:
                self.leader_address = ""
                return
            self.leader_address = ev.value.address  # type: ignore[attr-defined]

    async def resign(self) -> None:
        """Gives leadership up now (revoking the lease deletes the key) so a standby takes over."""
        await self._step_down()
