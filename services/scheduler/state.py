"""The scheduler's view of etcd: functions, nodes, instances, snapshots, node cordons and
tenants' quota overrides.

On start every prefix is listed and then watched from the listed revision + 1, so the
in-memory mirror is always a replay of etcd and a restarted scheduler rebuilds it the same
way. Writes go straight to etcd (CAS where they read first); the mirror catches up through the
watch. The one thing held outside etcd is ``note_started``: an instance a nodeagent just
reported ready in its RPC answer, kept until the watch shows that instance, so a claim can be
handed out without waiting for the watch round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from snapwake import errors, keys
from snapwake.aio import cancel_and_wait
from snapwake.etcd import EtcdClient
from snapwake.lifecycle import GONE, SERVING
from snapwake.v1.scheduler_pb2 import TenantQuota
from snapwake.v1.types_pb2 import Function, Instance, Node, NodeCordon, Snapshot

__all__ = ["ClusterState", "Mirror"]

log = logging.getLogger(__name__)
Listener = Callable[[str, Message | None], None]
# How long an instance reported by an RPC answer stands in for the watch.
_FRESH_TTL_S = 30.0


@dataclass
class Mirror:
    """One prefix mirrored: key -> (message, mod revision). Applies only newer events."""

    prefix: str
    cls: type[Message]
    items: dict[str, tuple[Message, int]] = field(default_factory=dict)
    # Revision of the last delete per key, so a stale put replayed after it is ignored.
    tombstones: dict[str, int] = field(default_factory=dict)
    accept: Callable[[str, Message], bool] | None = None
    """Whether a record belongs at its key; one that does not is held as absent (and logged)."""

    def _accepted(self, key: str, value: Message) -> bool:
        if self.accept is None or self.accept(key, value):
            return True
        log.warning("ignoring %s: the record does not belong at its key (forged or corrupt)", key)
        return False

    def reset(self, entries: list[tuple[str, Message, int]]) -> None:
        self.items = {k: (v, rev) for k, v, rev in entries if self._accepted(k, v)}
        self.tombstones = {}

    def apply(self, key: str, value: Message | None, revision: int) -> bool:
        """Applies one event; returns False if it was older than what we hold."""
        held = self.items.get(key)
        if held is not None and held[1] >= revision or self.tombstones.get(key, 0) >= revision:
            return False
        if value is not None and not self._accepted(key, value):
            if held is None:
                return False
            value = None  # a record that belonged here was overwritten with one that does not
        if value is None:
            self.items.pop(key, None)
            self.tombstones[key] = revision
        else:
            self.items[key] = (value, revision)
        return True

    def values(self) -> list[Message]:
        return [v for v, _ in self.items.values()]


class ClusterState:
    """The etcd view. ``await start()`` lists and watches; ``stop()`` cancels the watches."""

    def __init__(self, etcd: EtcdClient) -> None:
        self.etcd = etcd
        self.mirrors = {name: Mirror(prefix, cls) for name, prefix, cls in (
            ("functions", keys.FUNCTIONS, Function), ("nodes", keys.NODES, Node),
            ("instances", keys.INSTANCES, Instance), ("snapshots", keys.SNAPSHOTS, Snapshot),
            ("cordons", keys.CORDONS, NodeCordon), ("quotas", keys.QUOTAS, TenantQuota))}
        # A node writes only under its own prefix (snapwake.etcdauth): a record naming another
        # node, or an id other than its key's, is not believed.
        self.mirrors["instances"].accept = lambda key, inst: keys.instance_matches_key(
            key, inst.node, inst.id)  # type: ignore[attr-defined]
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._fresh: dict[str, tuple[Instance, float]] = {}

    def subscribe(self, listener: Listener) -> None:
        """``listener(key, value_or_None)`` runs on the event loop after each applied change."""
        self._listeners.append(listener)

    async def start(self) -> None:
        for mirror in self.mirrors.values():
            rev = await self._relist(mirror)
            self._tasks.append(asyncio.create_task(self._watch(mirror, rev), name=f"watch {mirror.prefix}"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks, what="state watches")
        self._tasks.clear()

    async def _relist(self, mirror: Mirror) -> int:
        entries, rev = await self.etcd.list_at(mirror.prefix, mirror.cls)
        mirror.reset([(e.key, e.value, e.mod_revision) for e in entries])  # type: ignore[attr-defined]
        self._notify(mirror.prefix, None)
        return rev

    async def _watch(self, mirror: Mirror, rev: int) -> None:
        while True:
            try:
                async for ev in self.etcd.watch(mirror.prefix, mirror.cls, start_revision=rev + 1):
                    rev = max(rev, ev.revision)
                    if mirror.apply(ev.key, ev.value, ev.revision):
                        held = mirror.items.get(ev.key)  # None where the record was not believed
                        self._notify(ev.key, held[0] if held else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd hiccup or compaction: relist and rewatch
                log.warning("watch on %s broke (%s); relisting", mirror.prefix, exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    rev = await self._relist(mirror)

    def _notify(self, key: str, value: Message | None) -> None:
        for listener in self._listeners:
            try:
                listener(key, value)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the watch
                log.exception("state listener failed for %s", key)

    # Reads -----------------------------------------------------------------------------
    def functions(self) -> list[Function]:
        return self.mirrors["functions"].values()  # type: ignore[return-value]

    def function(self, function_id: str) -> Function | None:
        held = self.mirrors["functions"].items.get(keys.function_key(function_id))
        return held[0] if held else None  # type: ignore[return-value]

    def nodes(self) -> list[Node]:
        return self.mirrors["nodes"].values()  # type: ignore[return-value]

    def node(self, name: str) -> Node | None:
        held = self.mirrors["nodes"].items.get(keys.node_key(name))
        return held[0] if held else None  # type: ignore[return-value]

    def cordon(self, node: str) -> NodeCordon | None:
        """The operator's cordon on ``node``, if there is one."""
        held = self.mirrors["cordons"].items.get(keys.cordon_key(node))
        return held[0] if held else None  # type: ignore[return-value]

    def cordoned(self) -> frozenset[str]:
        """Nodes that get no new instances."""
        return frozenset(c.node for c in self.mirrors["cordons"].values())  # type: ignore[attr-defined]

    def draining(self, node: str) -> bool:
        """Whether ``node``'s instances are being moved off it."""
        cordon = self.cordon(node)
        return cordon is not None and cordon.drain

    def quota(self, tenant: str) -> TenantQuota | None:
        """The operator's quota overrides for ``tenant``, if any (``services.scheduler.quota``)."""
        held = self.mirrors["quotas"].items.get(keys.quota_key(tenant))
        return held[0] if held else None  # type: ignore[return-value]

    def snapshots(self) -> list[Snapshot]:
        return self.mirrors["snapshots"].values()  # type: ignore[return-value]

    def snapshot(self, function_id: str, revision: int) -> Snapshot | None:
        held = self.mirrors["snapshots"].items.get(keys.snapshot_key(function_id, revision))
        return held[0] if held else None  # type: ignore[return-value]

    def instances(self) -> list[Instance]:
        """Instances in etcd, plus those an RPC answer reported that the watch has not shown yet."""
        mirror = self.mirrors["instances"]
        now = time.monotonic()
        for iid, (fresh, at) in list(self._fresh.items()):
            key = keys.instance_key(fresh.node, iid)
            seen = mirror.items.get(key)
            gone = key in mirror.tombstones
            # The mirror's copy at least as new as the answer (the node stamps every move) wins:
            # an instance suspended right after its start must not stay "RUNNING" here.
            caught_up = seen is not None and (
                seen[0].state in GONE | SERVING  # type: ignore[attr-defined]
                or seen[0].update_time.ToNanoseconds() >= fresh.update_time.ToNanoseconds())  # type: ignore[attr-defined]
            if gone or now - at > _FRESH_TTL_S or caught_up:
                del self._fresh[iid]
        held: dict[str, Instance] = {v.id: v for v in mirror.values()}  # type: ignore[attr-defined]
        for iid, (inst, _) in self._fresh.items():
            held[iid] = inst
        return list(held.values())

    def instance(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances() if i.id == instance_id), None)

    def note_started(self, inst: Instance) -> None:
        """Records a ready instance from a nodeagent's answer until the watch shows it."""
        self._fresh[inst.id] = (inst, time.monotonic())
        self._notify(keys.instance_key(inst.node, inst.id), inst)

    # Writes ----------------------------------------------------------------------------
    async def create_function(self, fn: Function) -> None:
        if not await self.etcd.create(keys.function_key(fn.id), fn):
            raise errors.AlreadyExists(f"function {fn.id} already exists", field="spec.name")

    async def update_function(self, function_id: str, mutate: Callable[[Function], Function | None]) -> Function:
        return await self.etcd.update(keys.function_key(function_id), Function, mutate)

    async def delete_function(self, function_id: str) -> None:
        if not await self.etcd.delete(keys.function_key(function_id)):
            raise errors.NotFound(f"function {function_id} does not exist", field="function_id")

    async def put_cordon(self, cordon: NodeCordon) -> None:
        await self.etcd.put(keys.cordon_key(cordon.node), cordon)

    async def delete_cordon(self, node: str) -> bool:
        return await self.etcd.delete(keys.cordon_key(node))

    async def put_snapshot(self, snap: Snapshot) -> None:
        await self.etcd.put(keys.snapshot_key(snap.function_id, snap.revision), snap)

    async def delete_snapshots(self, function_id: str) -> None:
        await self.etcd.delete_prefix(f"{keys.SNAPSHOTS}{function_id}/")
