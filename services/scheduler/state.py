"""The scheduler's view of etcd: functions, nodes, instances, snapshots, node cordons and
tenants' quota overrides.

On start every prefix is listed and then watched from the listed revision + 1, so the
in-memory mirror is always a replay of etcd and a restarted scheduler rebuilds it the same
way. Writes go straight to etcd (CAS where they read first); the mirror catches up through the
watch. The one thing held outside etcd is ``note_started``: an instance a nodeagent just
reported ready in its RPC answer, kept until the watch shows that instance, so a claim can be
handed out without waiting for the watch round trip.

Instance records are written by nodes, and a node's certificate may be stolen: a record is
believed only if it matches an intent (``/snapwake/intents/{id}``, which only the scheduler
writes, ``snapwake.etcdauth``) recorded before the scheduler asked that node to start that
instance: same id, node, function and revision. Others are held back (logged once, counted in
``snapwake_scheduler_ignored_instance_records_total``) and never routed to; one whose intent
arrives later (the intent watch behind the instance watch) is believed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from snapwake import errors, keys
from snapwake.aio import cancel_and_wait
from snapwake.etcd import EtcdClient
from snapwake.lifecycle import GONE, SERVING
from snapwake.v1.scheduler_pb2 import TenantQuota
from snapwake.v1.types_pb2 import Function, Instance, Node, NodeCordon, Snapshot

__all__ = ["ClusterState", "Mirror", "intent_of"]

log = logging.getLogger(__name__)
Listener = Callable[[str, Message | None], None]
# How long an instance reported by an RPC answer stands in for the watch.
_FRESH_TTL_S = 30.0
_MAX_LOGGED = 10_000
# Why an instance record is not believed (the ``reason`` label of the ignored-records metric).
_WHY = {
    "misplaced": "the record names another node or id than its key (forged or corrupt)",
    "unknown": "no instance of that id was asked of that node by the scheduler (made up, or its intent is gone)",
    "mismatch": "the record's function, revision or node differs from what the scheduler asked that node to start",
}


def intent_of(inst: Instance) -> Instance:
    """The intent record of ``inst``: what the scheduler asks its node to start, stamped now."""
    intent = Instance(id=inst.id, function_id=inst.function_id, revision=inst.revision, node=inst.node)
    intent.create_time.GetCurrentTime()
    return intent


@dataclass
class Mirror:
    """One prefix mirrored: key -> (message, mod revision). Applies only newer events."""

    prefix: str
    cls: type[Message]
    items: dict[str, tuple[Message, int]] = field(default_factory=dict)
    # Revision of the last delete per key, so a stale put replayed after it is ignored.
    tombstones: dict[str, int] = field(default_factory=dict)
    accept: Callable[[str, Message], str | None] | None = None
    """Why a record is not believed (None: it is); one that is not is held as absent, logged
    once per key and reason, and counted in ``ignored`` by reason."""
    # Records not believed (yet): rechecked when what they lacked arrives (``recheck``).
    held_back: dict[str, tuple[Message, int]] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)
    _logged: set[tuple[str, str]] = field(default_factory=set)

    def _accepted(self, key: str, value: Message) -> bool:
        why = self.accept(key, value) if self.accept is not None else None
        if why is None:
            return True
        self.ignored[why] += 1
        if (key, why) not in self._logged:
            if len(self._logged) >= _MAX_LOGGED:  # a hostile node writing endless keys: bounded
                self._logged.clear()
            self._logged.add((key, why))
            log.warning("ignoring %s: %s", key, _WHY.get(why, why))
        return False

    def reset(self, entries: list[tuple[str, Message, int]]) -> None:
        self.items, self.held_back = {}, {}
        for k, v, rev in entries:
            (self.items if self._accepted(k, v) else self.held_back)[k] = (v, rev)
        self.tombstones = {}

    def apply(self, key: str, value: Message | None, revision: int) -> bool:
        """Applies one event; returns False if it was older than what we hold."""
        held = self.items.get(key) or self.held_back.get(key)
        if held is not None and held[1] >= revision or self.tombstones.get(key, 0) >= revision:
            return False
        self.held_back.pop(key, None)
        if value is not None and not self._accepted(key, value):
            self.held_back[key] = (value, revision)
            if key not in self.items:
                return False
            self.items.pop(key)  # a record that was believed was overwritten with one that is not
            return True
        if value is None:
            self.items.pop(key, None)
            self.tombstones[key] = revision
        else:
            self.items[key] = (value, revision)
        return True

    def recheck(self, wanted: Callable[[str], bool]) -> list[str]:
        """Believes the held-back records (of keys ``wanted`` says) that are believable now;
        returns their keys."""
        promoted = []
        for key, (value, rev) in list(self.held_back.items()):
            if wanted(key) and self.accept is not None and self.accept(key, value) is None:
                del self.held_back[key]
                self.items[key] = (value, rev)
                promoted.append(key)
        return promoted

    def values(self) -> list[Message]:
        return [v for v, _ in self.items.values()]


class ClusterState:
    """The etcd view. ``await start()`` lists and watches; ``stop()`` cancels the watches."""

    def __init__(self, etcd: EtcdClient) -> None:
        self.etcd = etcd
        # Intents are listed (and watched) before instances, so a restarted scheduler knows
        # which instance records to believe when it lists them.
        self.mirrors = {name: Mirror(prefix, cls) for name, prefix, cls in (
            ("functions", keys.FUNCTIONS, Function), ("nodes", keys.NODES, Node),
            ("intents", keys.INTENTS, Instance),
            ("instances", keys.INSTANCES, Instance), ("snapshots", keys.SNAPSHOTS, Snapshot),
            ("pins", keys.SNAPSHOT_PINS, Snapshot),
            ("cordons", keys.CORDONS, NodeCordon), ("quotas", keys.QUOTAS, TenantQuota))}
        self.mirrors["intents"].accept = lambda key, intent: (
            None if keys.split_intent_key(key) == intent.id else "misplaced")  # type: ignore[attr-defined]
        self.mirrors["instances"].accept = self.why_not_believed  # type: ignore[assignment]
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
        if mirror.prefix == keys.INTENTS:
            self._recheck(lambda _id: True)
        return rev

    def _recheck(self, wanted: Callable[[str], bool]) -> None:
        """Believes held-back instance records whose intent (``wanted(id)``) arrived."""
        instances = self.mirrors["instances"]
        for key in instances.recheck(lambda k: (w := keys.split_instance_key(k)) is not None and wanted(w[1])):
            self._notify(key, instances.items[key][0])

    def why_not_believed(self, key: str, inst: Instance) -> str | None:
        """Why the instance record at ``key`` is not believed, None when it is: it must be where
        its node writes (``keys.instance_matches_key``; etcd lets a node write only there) and
        match what the scheduler asked that node to start (its intent: id, node, function,
        revision). A node's certificate can thus not make up instances, reuse another's id, or
        move one to another function."""
        if not keys.instance_matches_key(key, inst.node, inst.id):
            return "misplaced"
        held = self.mirrors["intents"].items.get(keys.intent_key(inst.id))
        if held is None:
            return "unknown"
        intent: Instance = held[0]  # type: ignore[assignment]
        if (intent.node, intent.function_id, intent.revision) != (inst.node, inst.function_id, inst.revision):
            return "mismatch"
        return None

    def ignored_records(self) -> dict[str, int]:
        """Instance records not believed since start, by reason (misplaced, unknown, mismatch)."""
        return dict(self.mirrors["instances"].ignored)

    def intents(self) -> list[Instance]:
        return self.mirrors["intents"].values()  # type: ignore[return-value]

    def _applied(self, mirror: Mirror, key: str) -> None:
        held = mirror.items.get(key)  # None where the record was not believed
        self._notify(key, held[0] if held else None)
        if mirror.prefix == keys.INTENTS and held is not None:
            self._recheck(lambda iid: iid == held[0].id)  # type: ignore[attr-defined]

    async def _watch(self, mirror: Mirror, rev: int) -> None:
        while True:
            try:
                async for ev in self.etcd.watch(mirror.prefix, mirror.cls, start_revision=rev + 1):
                    rev = max(rev, ev.revision)
                    if mirror.apply(ev.key, ev.value, ev.revision):
                        self._applied(mirror, ev.key)
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

    def snapshot_pin(self, function_id: str, revision: int) -> Snapshot | None:
        """The manifest digest the scheduler pinned for a revision's snapshot (``pin_snapshot``)."""
        held = self.mirrors["pins"].items.get(keys.snapshot_pin_key(function_id, revision))
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
        """Records a ready instance from a nodeagent's answer until the watch shows it (only
        one that matches its intent, as the watch's records must)."""
        if self.why_not_believed(keys.instance_key(inst.node, inst.id), inst) is not None:
            log.warning("ignoring the answer for %s on %s: not the instance asked for", inst.id, inst.node)
            return
        self._fresh[inst.id] = (inst, time.monotonic())
        self._notify(keys.instance_key(inst.node, inst.id), inst)

    # Writes ----------------------------------------------------------------------------
    async def record_intent(self, inst: Instance) -> None:
        """Persists that the scheduler asks ``inst.node`` to start ``inst`` (before it asks), so
        that this scheduler and any later leader believe that node's record of it and no other."""
        intent = intent_of(inst)
        key = keys.intent_key(inst.id)
        rev = await self.etcd.put(key, intent)
        mirror = self.mirrors["intents"]
        if mirror.apply(key, intent, rev):  # now, not when the watch brings it
            self._applied(mirror, key)

    async def forget_intent(self, intent: Instance, mod_revision: int) -> bool:
        """Deletes an intent unless it changed since ``mod_revision``."""
        return await self.etcd.delete(keys.intent_key(intent.id), mod_revision)

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

    async def pin_snapshot(self, snap: Snapshot, node: str) -> None:
        """Records ``snap``'s manifest digest, as ``node`` (the node asked to build it) stored
        it, where only the scheduler writes: nodes attach only a copy of that digest, whatever
        the shared snapshot record says later (``services.nodeagent.integrity``)."""
        pin = Snapshot(id=snap.id, function_id=snap.function_id, revision=snap.revision,
                       manifest_digest=snap.manifest_digest, total_bytes=snap.total_bytes, disk_nodes=[node])
        key = keys.snapshot_pin_key(snap.function_id, snap.revision)
        rev = await self.etcd.put(key, pin)
        mirror = self.mirrors["pins"]
        if mirror.apply(key, pin, rev):
            self._applied(mirror, key)

    async def delete_snapshots(self, function_id: str) -> None:
        await self.etcd.delete_prefix(f"{keys.SNAPSHOTS}{function_id}/")
        await self.etcd.delete_prefix(f"{keys.SNAPSHOT_PINS}{function_id}/")
