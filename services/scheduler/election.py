"""Leader election through an etcd lease on ``keys.LEADER``.

A candidate takes a lease and creates the key under it only if absent. The winner leads while
its lease lives (``LeaseKeeper`` refreshes it); the others watch the key and campaign again
when it is deleted or expires. The value is a ``Node`` message whose ``name`` is the
scheduler's id and ``address`` its advertised gRPC address, so callers can find the leader.

Two leaders never act at once. Leadership is judged by this process's own monotonic clock,
never by waiting for etcd: ``is_leader`` is true only while ``LeaseKeeper.held()`` is, which
ends a margin before etcd can at the earliest expire the lease (its last successful refresh was
*sent* plus the TTL, less the keeper's skew). A successor can only create the key after etcd
expired the lease, so the old leader has stopped before the new one starts, even when it is cut
off from etcd and hears nothing. ``_lead`` wakes at that deadline by itself (it does not rely on
the keeper's loop noticing), calls ``on_deposed`` and logs "stepped down"; every RPC that acts as
leader checks ``require()`` (the claim service checks it again before it answers a grant).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from snapwake import errors, keys
from snapwake.etcd import EtcdClient, LeaseKeeper
from snapwake.v1.types_pb2 import Node

__all__ = ["Election"]

log = logging.getLogger(__name__)
Hook = Callable[[], Awaitable[None]]


class Election:
    """Campaigns forever; ``on_elected``/``on_deposed`` run as leadership changes."""

    def __init__(self, etcd: EtcdClient, ident: str, address: str, ttl_s: int, on_elected: Hook, on_deposed: Hook,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd, self.ident, self.address, self.ttl_s = etcd, ident, address, ttl_s
        self.on_elected, self.on_deposed, self.clock = on_elected, on_deposed, clock
        self.leader_address = ""
        # Why the last round failed (etcd unreachable, say), for the "not the leader" answer.
        self.trouble = ""
        self._leading = False
        self._keeper: LeaseKeeper | None = None
        self._lost = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        """True while this process won and its lease is certainly alive by its own clock."""
        return self._leading and self._keeper is not None and self._keeper.held()

    def require(self) -> None:
        """Raises ``Unavailable`` naming the leader unless this process leads."""
        if not self.is_leader:
            where = self.leader_address or "unknown (election in progress)"
            why = f"; {self.trouble}" if self.trouble and not self.leader_address else ""
            raise errors.Unavailable(f"not the leader; leader is at {where}{why}")

    async def run(self) -> None:
        while True:
            try:
                if await self._campaign():
                    await self._lead()
                else:
                    await self._follow()
                self.trouble = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: step down, back off, try again
                log.warning("election round failed: %s", exc)
                self.trouble = f"etcd: {getattr(exc, 'message', None) or exc}"
                self.leader_address = ""
                await self._step_down()
                await asyncio.sleep(1.0)

    async def _campaign(self) -> bool:
        self._lost = asyncio.Event()
        keeper = LeaseKeeper(self.etcd, self.ttl_s, on_lost=self._on_lease_lost,
                             on_expired=self._on_lease_lost, clock=self.clock)
        lease = await keeper.start()
        if await self.etcd.create(keys.LEADER, Node(name=self.ident, address=self.address), lease=lease):
            self._keeper = keeper
            self.trouble = ""
            return True
        await keeper.stop(revoke=True)
        return False

    async def _on_lease_lost(self) -> None:
        self._lost.set()

    async def _lead(self) -> None:
        assert self._keeper is not None
        keeper = self._keeper
        self._leading, self.leader_address = True, self.address
        log.info("elected leader as %s at %s (lease %x, held for %.2fs by our clock)", self.ident, self.address,
                 keeper.lease_id, keeper.expires_at - self.clock())
        await self.on_elected()
        # Wakes at the keeper's deadline on its own: a refresh stuck on a silent etcd must not
        # keep us leading past it.
        while not self._lost.is_set() and keeper.held():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), max(0.01, keeper.expires_at - self.clock()))
        log.warning("stepped down as %s: leader lease %x is no longer held by our clock", self.ident,
                    keeper.lease_id)
        await self._step_down()

    async def _step_down(self) -> None:
        """Stops acting first (``on_deposed``), then gives the lease up (which may wait on etcd)."""
        was_leader, self._leading = self._leading, False
        keeper, self._keeper = self._keeper, None
        if was_leader:
            self.leader_address = ""
            await self.on_deposed()
        if keeper is not None:
            await keeper.stop(revoke=True)

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
