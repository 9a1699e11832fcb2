"""Bringing up one instance for a function: restore a standby, else start one normally.

Placement runs the policy framework over the mirror plus the starts in flight (their slices
are reserved here until the watch shows them), and evicts LRU idle instances when no GPU has
room. ``None`` means "no capacity now": the caller waits; ``StartFailed`` means the node tried
and failed; ``ResourceExhausted`` means the function's tenant is at its GPU memory quota
(``services.scheduler.quota``), so one tenant cannot take a node's every GPU.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass

from services.scheduler import policy, quota
from services.scheduler.claimtable import ClaimTable
from services.scheduler.nodes import NodeUnreachable
from services.scheduler.nodes_base import Nodes
from services.scheduler.policy.eviction import GpuRoom, plan_eviction
from services.scheduler.policy.filter_gpu_slice import gpu_free_bytes
from services.scheduler.spec import seconds
from services.scheduler.state import ClusterState
from snapwake import errors, keys, telemetry
from snapwake.v1.nodeagent_pb2 import StartTarget
from snapwake.v1.scheduler_pb2 import ClaimSource
from snapwake.v1.types_pb2 import (
    Function,
    Instance,
    InstanceState,
    Node,
    Snapshot,
    SnapshotMode,
    SnapshotState,
)

__all__ = ["StartResult", "Starter", "new_instance_id", "snapshot_usable"]

log = logging.getLogger(__name__)


def snapshot_usable(fn: Function, snap: Snapshot | None, pin: Snapshot | None = None) -> bool:
    """Whether ``fn``'s standbys may attach its snapshot: always outside ARENA mode (nothing to
    attach), else only while the record is READY (never a corrupt or rebuilding one) and, once
    the scheduler pinned its manifest digest (``ClusterState.pin_snapshot``), of that digest."""
    if fn.spec.policy.snapshot_mode != SnapshotMode.SNAPSHOT_MODE_ARENA:
        return True
    return snap is not None and snap.state == SnapshotState.SNAPSHOT_STATE_READY and (
        pin is None or pin.manifest_digest == snap.manifest_digest)


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(6)


@dataclass(frozen=True)
class StartResult:
    instance: Instance
    source: ClaimSource


class Starter:
    def __init__(self, state: ClusterState, nodes: Nodes, table: ClaimTable, stale_after_s: float,
                 quotas: quota.Quotas | None = None) -> None:
        self.state, self.nodes, self.table = state, nodes, table
        self.quotas = quotas or quota.Quotas(quota.Limits())
        self.filters = policy.default_filters(stale_after_s)
        self.scores = policy.default_scores()
        self.pending: dict[str, Instance] = {}
        self.restoring: set[str] = set()
        # instance id -> (ClaimSource of its start, when the start ended; inf while in flight).
        self.origin: dict[str, tuple[ClaimSource, float]] = {}

    def _begin(self, iid: str, source: ClaimSource) -> None:
        now = time.monotonic()
        self.origin = {k: v for k, v in self.origin.items() if now - v[1] < 600}
        self.origin[iid] = (source, math.inf)

    def _end(self, iid: str) -> None:
        if iid in self.origin:
            self.origin[iid] = (self.origin[iid][0], time.monotonic())

    def view(self, only: set[str] | None = None) -> policy.ClusterView:
        self.prune()
        nodes = tuple(n for n in self.state.nodes()
                      if (only is None or n.name in only) and self.nodes.reachable(n.name))
        held = {i.id: i for i in self.state.instances()}
        held.update(self.pending)
        return policy.ClusterView(nodes, tuple(held.values()), self.state.cordoned())

    def request(self, fn: Function, gpus: frozenset[tuple[str, int]] | None = None) -> policy.Request:
        return policy.Request(fn.id, fn.revision, fn.spec.resources.gpu_count,
                              fn.spec.resources.gpu_memory_bytes, keys.snapshot_id(fn.id, fn.revision),
                              time.time(), gpus)

    @telemetry.traced("placement")
    async def place(self, fn: Function, only: set[str] | None = None,
                    gpus: frozenset[tuple[str, int]] | None = None, evict: bool = True) -> policy.Placement | None:
        """A node and GPU for one instance of ``fn`` (among ``gpus`` if given), evicting idle
        instances if that makes room (unless ``evict`` is false)."""
        req = self.request(fn, gpus)
        status, placement = policy.schedule(req, self.view(only), self.filters, self.scores)
        if placement is not None or not evict:
            return placement
        if req.gpu_count and await self._evict_for(req, only):
            status, placement = policy.schedule(req, self.view(only), self.filters, self.scores)
        if placement is None:
            log.info("no placement: %s", status.message, extra={"function_id": fn.id})
        return placement

    async def _evict_for(self, req: policy.Request, only: set[str] | None) -> bool:
        view = self.view(only)
        rooms = [GpuRoom(n.name, idx, free) for n in view.nodes
                 for idx, free in gpu_free_bytes(n, view.on_node(n.name)).items() if req.allows(n.name, idx)]
        mins = {f.id: f.spec.policy.min_instances for f in self.state.functions()}
        plan = plan_eviction(req.gpu_memory_bytes, rooms, list(view.instances), mins, self.table.busy_instances())
        node = self.state.node(plan.node) if plan else None
        if plan is None or node is None:
            return False
        if any(self.table.in_use(v.id) for v in plan.victims):
            return False
        for victim in plan.victims:
            self.table.retire(victim.id)

        async def evict(victim: Instance) -> None:
            if self.parkable(victim):
                log.info("parking idle instance as a standby for %s", req.function_id,
                         extra={"instance_id": victim.id})
                await self.park(node, victim)
                return
            log.info("evicting idle instance for %s", req.function_id, extra={"instance_id": victim.id})
            await self.nodes.stop(node, victim.id)
            # Counted as gone now; the watch confirms when the node deletes the key.
            self.pending[victim.id] = _with_state(victim, InstanceState.INSTANCE_STATE_STOPPING)

        # All at once: a large model evicting several small ones waits for one park (~0.6 s),
        # not one after the other (the node bounds concurrent checkpoints itself).
        await asyncio.gather(*(evict(v) for v in plan.victims))
        return True

    def parkable(self, inst: Instance) -> bool:
        """An idle instance becomes its function's standby on its node (release the GPU memory
        and checkpoint, ~0.6 s) instead of ending, while that node has fewer standbys of the
        function than ``standby_per_node``: the next cold start then needs no fresh container."""
        fn = self.state.function(inst.function_id)
        if fn is None or fn.revision != inst.revision or not fn.spec.policy.standby_per_node:
            return False
        if fn.spec.policy.snapshot_mode not in (SnapshotMode.SNAPSHOT_MODE_ARENA, SnapshotMode.SNAPSHOT_MODE_PROCESS):
            return False
        if not snapshot_usable(fn, self.state.snapshot(fn.id, fn.revision), self.state.snapshot_pin(fn.id, fn.revision)):
            return False
        standbys = [i for i in self.state.instances() if i.function_id == fn.id and i.node == inst.node
                    and i.revision == fn.revision and i.state == InstanceState.INSTANCE_STATE_STANDBY]
        return len(standbys) < fn.spec.policy.standby_per_node and self.standby_room(quota.tenant_of(fn.id)) > 0

    async def park(self, node: Node, inst: Instance) -> None:
        """Suspends ``inst`` to STANDBY; it can be claimed again once the node reports that.
        A claim granted between the decision to park and now keeps it serving."""
        if not self.table.retire(inst.id):
            log.info("not parked: a claim went out since the decision", extra={"instance_id": inst.id})
            return
        try:
            parked = await self.nodes.suspend(node, inst.id)
            self.pending[inst.id] = parked
        except errors.FailedPrecondition as exc:
            # Not IDLE any more (already parked, or serving again): nothing to undo.
            log.info("not parked: %s", exc.message, extra={"instance_id": inst.id})
        except errors.SnapwakeError as exc:
            # RESOURCE_EXHAUSTED: the node's host memory holds no more standbys; the instance is
            # untouched, and ends as it would without a standby to become.
            log.warning("parking failed (%s); stopping it", exc.message, extra={"instance_id": inst.id})
            await self.nodes.stop(node, inst.id)
            self.pending[inst.id] = _with_state(inst, InstanceState.INSTANCE_STATE_STOPPING)
            return
        finally:
            self.table.unretire(inst.id)

    def check_gpu_quota(self, fn: Function) -> None:
        """ResourceExhausted when one more instance of ``fn`` would take its tenant past its GPU
        memory quota, counting the instances being started too."""
        tenant = quota.tenant_of(fn.id)
        limit = self.quotas.limits(tenant).gpu_memory_bytes
        if limit:
            used = sum(quota.gpu_bytes(i) for i in self.view().instances if quota.tenant_of(i.function_id) == tenant)
            quota.check("gpu_memory_bytes", tenant, limit, used,
                        fn.spec.resources.gpu_count * fn.spec.resources.gpu_memory_bytes)

    def standby_room(self, tenant: str, starting: int = 0) -> int:
        """How many more standbys ``tenant`` may have (a large number without a limit), given
        ``starting`` standby starts in flight. STARTING instances count as standbys to come."""
        limit = self.quotas.limits(tenant).standbys
        if not limit:
            return 1 << 30
        held = sum(1 for i in self.state.instances() if quota.tenant_of(i.function_id) == tenant
                   and i.state in (InstanceState.INSTANCE_STATE_STANDBY, InstanceState.INSTANCE_STATE_STARTING))
        return limit - held - starting

    async def start(self, fn: Function) -> StartResult | None:
        """Restores a standby of ``fn`` or starts a new instance; None when nothing fits."""
        self.check_gpu_quota(fn)
        standbys = [i for i in self.state.instances() if i.function_id == fn.id and i.revision == fn.revision
                    and i.state == InstanceState.INSTANCE_STATE_STANDBY and i.id not in self.restoring]
        if standbys and not snapshot_usable(fn, self.state.snapshot(fn.id, fn.revision), self.state.snapshot_pin(fn.id, fn.revision)):
            standbys = []  # its snapshot is corrupt or being rebuilt: never attach it, start normally
        placement = None
        if standbys:
            # A standby restores onto the GPU it was checkpointed on (the node refuses another:
            # the sandbox grants the container that GPU's device node alone). So placement looks
            # at the standbys' GPUs first, evicting the least recently used idle instances there:
            # a restore (0.6-1.0 s on the H200s) beats a normal start on another GPU (14 s for a
            # small model there), even when a less recently used instance idles elsewhere. Only
            # when no standby's GPU can be freed does a normal start go where there is room.
            on_gpu = bool(fn.spec.resources.gpu_count)
            pairs = frozenset((i.node, i.gpu_index) for i in standbys) if on_gpu else None
            placement = await self.place(fn, {i.node for i in standbys}, pairs)
            if placement is None and on_gpu:
                placement = await self.place(fn)
            if placement is not None:
                chosen = next((i for i in standbys if i.node == placement.node.name
                               and (not on_gpu or i.gpu_index == placement.gpu_index)), None)
                if chosen is not None:
                    self.check_gpu_quota(fn)  # again: placing may have waited on an eviction
                    try:
                        return await self._restore(fn, chosen, placement)
                    except NodeUnreachable as exc:
                        log.warning("%s; placing elsewhere", exc.message, extra={"function_id": fn.id})
                        return None  # the caller places again; the view now leaves that node out
        if placement is None:
            placement = await self.place(fn)
        if placement is None:
            return None
        self.check_gpu_quota(fn)  # again, with no wait before ``_start`` counts this one as pending
        try:
            inst = await self._start(fn, placement.node, placement.gpu_index, StartTarget.START_TARGET_RUNNING)
        except NodeUnreachable as exc:  # a dead node whose keys have not expired yet
            log.warning("%s; placing elsewhere", exc.message, extra={"function_id": fn.id})
            return None  # the caller places again; the view now leaves that node out
        return StartResult(inst, ClaimSource.CLAIM_SOURCE_NORMAL_START)

    @telemetry.traced("cold_start")
    async def _restore(self, fn: Function, standby: Instance, placement: policy.Placement) -> StartResult:
        reserved = _with_state(standby, InstanceState.INSTANCE_STATE_RESTORING)
        reserved.gpu_index, reserved.gpu_memory_bytes = placement.gpu_index, fn.spec.resources.gpu_memory_bytes
        self.pending[standby.id] = reserved
        self.restoring.add(standby.id)
        self._begin(standby.id, ClaimSource.CLAIM_SOURCE_COLD_START)
        try:
            inst = await self.nodes.restore(placement.node, standby.id, placement.gpu_index,
                                            seconds(fn.spec.policy.start_timeout))
        finally:
            self.pending.pop(standby.id, None)
            self.restoring.discard(standby.id)
            self._end(standby.id)
        _check_answer(standby, inst)
        self.state.note_started(inst)
        return StartResult(inst, ClaimSource.CLAIM_SOURCE_COLD_START)

    @telemetry.traced("start")
    async def _start(self, fn: Function, node: Node, gpu_index: int, target: int) -> Instance:
        iid = new_instance_id()
        asked = Instance(id=iid, function_id=fn.id, revision=fn.revision, node=node.name,
                         gpu_index=gpu_index, gpu_memory_bytes=fn.spec.resources.gpu_memory_bytes,
                         state=InstanceState.INSTANCE_STATE_CREATING)
        self.pending[iid] = asked
        if target == StartTarget.START_TARGET_RUNNING:
            self._begin(iid, ClaimSource.CLAIM_SOURCE_NORMAL_START)
        try:
            # Persisted before the node is asked: only what the scheduler asked for is believed.
            await self.state.record_intent(asked)
            inst = await self.nodes.start(node, iid, fn.id, fn.revision, fn.spec, target, gpu_index,
                                          seconds(fn.spec.policy.start_timeout), fn.image_digest)
        finally:
            self.pending.pop(iid, None)
            self._end(iid)
        _check_answer(asked, inst)
        if target == StartTarget.START_TARGET_RUNNING:
            self.state.note_started(inst)
        return inst

    async def start_target(self, fn: Function, node: Node, gpu_index: int, target: int) -> Instance:
        """A start the controller asks for (standby or snapshot build) on a chosen node."""
        return await self._start(fn, node, gpu_index, target)

    def prune(self) -> None:
        """Drops eviction markers the watch has caught up with."""
        live = {i.id for i in self.state.instances()}
        for iid, inst in list(self.pending.items()):
            if inst.state == InstanceState.INSTANCE_STATE_STOPPING and iid not in live:
                del self.pending[iid]


def _check_answer(asked: Instance, got: Instance) -> None:
    """StartFailed when a node answers with another instance than the one asked for (a
    compromised node must not route requests to something else)."""
    if (got.id, got.node, got.function_id, got.revision) != (asked.id, asked.node, asked.function_id, asked.revision):
        raise errors.StartFailed(f"node {asked.node} answered the start of {asked.id} with another instance "
                                 f"({got.id or '?'} of {got.function_id or '?'} on {got.node or '?'})")


def _with_state(inst: Instance, state: InstanceState) -> Instance:
    out = Instance()
    out.CopyFrom(inst)
    out.state = state  # type: ignore[assignment]
    return out


