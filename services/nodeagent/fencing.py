"""Fencing: what a node does once its etcd lease is gone, and how it comes back.

A node's keys live under its lease. Once the lease may have run out (by the node's own clock:
``LeaseKeeper`` says so before etcd can expire it, and also when etcd answers that it did),
the scheduler may already count the node's instances as gone and start their work elsewhere.
So the node fences itself (``fence``):

- it takes no new work: StartInstance and RestoreInstance answer UNAVAILABLE naming "fenced";
- it writes nothing to etcd (it has no lease to write under; ``NodeAgent.publish`` and
  ``register`` skip while fenced, and the state is written when it rejoins);
- each serving instance gets up to ``fence_drain_s`` to finish its requests in flight, then is
  stopped, which frees its GPU; standbys hold no GPU and stay parked.

When etcd answers again the keeper revokes the old lease (its keys spoke for a node that has
stopped acting on them) and takes a new one, and the node rejoins (``rejoin``) before it serves
again: it deletes any instance key of its own left under an old lease, offers each parked
standby again only if etcd still has its function at that revision (else stops it), and
registers the node. A failure on the way leaves it fenced, and the keeper tries again.

    SERVING --lease gone--> FENCED --new lease--> REJOINING --reconciled--> SERVING
                                ^                     |
                                +------ failed -------+
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING

from snapwake import keys
from snapwake.lifecycle import SERVING
from snapwake.v1 import types_pb2
from snapwake.v1.types_pb2 import InstanceState

if TYPE_CHECKING:
    from services.nodeagent.agent import Live, NodeAgent

__all__ = ["Standing", "fence", "rejoin"]

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.1


class Standing(enum.Enum):
    """Whether the node acts on its lease."""

    SERVING = "serving"  # its lease is held: it takes work and reports to etcd
    FENCED = "fenced"  # its lease is gone: no new work, no etcd writes, serving instances stopped
    REJOINING = "rejoining"  # a new lease: reconciling with etcd, still no new work

    def to(self, new: Standing) -> Standing:
        """``new``, if the move is legal; raises ValueError otherwise."""
        if new not in _MOVES[self]:
            raise ValueError(f"node standing {self.value} -> {new.value} is not a legal move")
        log.warning("node standing: %s -> %s", self.value, new.value)
        return new


_MOVES: dict[Standing, frozenset[Standing]] = {
    Standing.SERVING: frozenset({Standing.FENCED}),
    Standing.FENCED: frozenset({Standing.REJOINING}),
    Standing.REJOINING: frozenset({Standing.SERVING, Standing.FENCED}),
}


async def fence(agent: NodeAgent) -> None:
    """The lease is gone: stop taking work, let requests in flight finish, stop serving
    instances (their GPUs are free again), keep standbys parked."""
    if agent.standing is Standing.SERVING:
        agent.standing = agent.standing.to(Standing.FENCED)
    log.warning("node %s fenced, %s; stopping its %d serving instances once their requests finish",
                agent.config.name, agent.fenced(), sum(1 for live in agent.instances.values()
                                                       if live.machine.state in SERVING))
    await asyncio.gather(*(_fence_instance(agent, live) for live in list(agent.instances.values())))


async def _fence_instance(agent: NodeAgent, live: Live) -> None:
    async with live.lock:  # a flow in progress finishes first (each is bounded)
        if not live.machine.live or live.machine.state == InstanceState.INSTANCE_STATE_STANDBY:
            return
        left = await _drained(agent, live, agent.config.fence_drain_s)
        note = "" if left == 0 else f" ({left} requests still in flight after {agent.config.fence_drain_s:g}s)"
        await agent.end(live, f"node {agent.config.name} fenced: its etcd lease is gone{note}")


async def _drained(agent: NodeAgent, live: Live, limit_s: float) -> int:
    """Waits until the instance has no request in flight (at most ``limit_s``); returns how many
    are left (0 when unknown: a server that cannot say is not waited for)."""
    deadline = time.monotonic() + limit_s
    while True:
        inflight = await agent.inflight(live) if live.machine.state in SERVING else 0
        if not inflight or time.monotonic() >= deadline:
            return inflight or 0
        await asyncio.sleep(_DRAIN_POLL_S)


async def rejoin(agent: NodeAgent) -> None:
    """A new lease is held: reconcile with etcd, then serve again. Raises (leaving the node
    fenced) when etcd fails on the way; the keeper then tries again under another lease."""
    agent.standing = agent.standing.to(Standing.REJOINING)
    try:
        await _reconcile(agent)
    except BaseException:
        agent.standing = agent.standing.to(Standing.FENCED)
        raise
    agent.standing = agent.standing.to(Standing.SERVING)
    log.warning("node %s rejoined under lease %x: serving again", agent.config.name, agent.lease.lease_id)


async def _reconcile(agent: NodeAgent) -> None:
    name, lease = agent.config.name, agent.lease.lease_id
    for entry in await agent.etcd.list(keys.instance_prefix(name), types_pb2.Instance):
        if entry.lease != lease:
            await agent.etcd.delete(entry.key, entry.mod_revision)
    revisions = {e.value.id: e.value.revision  # type: ignore[attr-defined]
                 for e in await agent.etcd.list(keys.FUNCTIONS, types_pb2.Function)}
    for live in list(agent.instances.values()):
        async with live.lock:
            inst = live.machine.instance
            if not live.machine.live:
                continue  # ended here while fenced; forgotten after its linger
            if live.machine.state == InstanceState.INSTANCE_STATE_STANDBY \
                    and revisions.get(inst.function_id) == inst.revision:
                await agent.write_instance(live)
                log.info("standby offered again after the fence", extra={"instance_id": live.id})
            else:
                await agent.end(live, f"node {name} rejoined: etcd no longer wants this instance")
    await agent.write_node()
