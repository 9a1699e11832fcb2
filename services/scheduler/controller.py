"""The reconcile loop (leader only): snapshots, standbys, min/max instances, scale in, cleanup,
each revision's model metadata (from its first instance that reported one), and the bound on
restarts of a revision whose instances keep failing (``crashloop``).

Each pass compares the desired state (functions in etcd) with the actual state (instances and
snapshots in etcd) and starts at most one operation per (function, kind); operations run as
tasks so one slow node does not stall the loop.
A node that has no room for a function's standby (``NodeFull``: its host memory holds no more
whole-process standbys) is not asked for that standby again for ``_STANDBY_BACKOFF_S``.

A node an operator drains (``snapwake node drain``) loses its instances here, make before
break: a drained instance no longer counts, so ``_scale`` starts its replacement elsewhere;
it is stopped once no claim is in use on it and either its function has a serving instance
off draining nodes (which the broker then prefers) or wants none. Standbys go at once.
Instances still being started or restored finish first: stopping them would fail the requests
waiting for them. A replacement that cannot be placed keeps the drain from finishing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from services.scheduler import quota
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.crashloop import CrashLoop, Restarts
from services.scheduler.nodes import NodeFull
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.spec import seconds
from services.scheduler.starter import Starter, snapshot_usable
from services.scheduler.state import ClusterState
from snapwake import errors, keys
from snapwake.aio import cancel_and_wait
from snapwake.lifecycle import LIVE, SERVING
from snapwake.v1.nodeagent_pb2 import StartTarget
from snapwake.v1.types_pb2 import (
    Function,
    FunctionState,
    Instance,
    InstanceState,
    ModelMetadata,
    SnapshotMode,
)

__all__ = ["Controller"]

log = logging.getLogger(__name__)
# How long a node that had no room for a function's standby (``NodeFull``) is not asked for
# another: asking every pass would be refused every pass, or start a container only to end it.
_STANDBY_BACKOFF_S = 30.0
# An intent (what the scheduler asked a node to start) is forgotten once no node records its
# instance, and its start timeout plus this long have passed since it was recorded: a node
# whose etcd lease lapsed that long has lost its instances' records, and re-recording them
# afterwards is not believed.
INTENT_GRACE_S = 600.0


class Controller:
    def __init__(self, state: ClusterState, starter: Starter, broker: ClaimBroker, queues: QueueDepths,
                 builder: SnapshotBuilder, interval_s: float, crashes: CrashLoop | None = None) -> None:
        self.state, self.starter, self.broker, self.queues = state, starter, broker, queues
        self.builder, self.interval_s = builder, interval_s
        self.crashes = crashes or CrashLoop(limit=5, window_s=600.0)
        self._ops: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._standbys_started: dict[str, tuple[str, float]] = {}  # iid -> (node, when)
        # (function id, node) -> when (monotonic) that node may be asked for its standby again.
        self._standbys_deferred: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="controller")

    async def stop(self) -> None:
        await cancel_and_wait([self._task, *self._ops.values()], what="controller")
        self._task = None
        self._ops.clear()

    async def _loop(self) -> None:
        while True:
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - a bad pass must not end reconciliation
                log.exception("reconcile pass failed")
            await asyncio.sleep(self.interval_s)

    def _spawn(self, key: str, make: Callable[[], Awaitable[None]]) -> None:
        if key in self._ops:
            return

        async def run() -> None:
            try:
                await make()
            except errors.SnapwakeError as exc:
                log.warning("%s: %s", key, exc.message)
            finally:
                self._ops.pop(key, None)

        self._ops[key] = asyncio.create_task(run(), name=key)

    def reconcile(self) -> None:
        """One pass over every function and instance; starts operations, never awaits them."""
        functions = {f.id: f for f in self.state.functions()}
        self.crashes.keep({keys.snapshot_id(f.id, f.revision) for f in functions.values()})
        for fn in functions.values():
            self._record_model(fn)
            if fn.state == FunctionState.FUNCTION_STATE_PENDING:
                self.builder.reconcile(fn, self._spawn)
            elif fn.state == FunctionState.FUNCTION_STATE_READY:
                restarts = self._restarts(fn)
                if restarts is Restarts.STOP:
                    continue  # a crash loop: the function is being marked FAILED
                self._scale(fn, start=restarts is Restarts.START)
                if snapshot_usable(fn, self.state.snapshot(fn.id, fn.revision), self.state.snapshot_pin(fn.id, fn.revision)):
                    if restarts is Restarts.START:
                        self._standbys(fn)
                else:  # marked corrupt by a node (or lost): rebuild it; requests get normal starts meanwhile
                    self.builder.reconcile(fn, self._spawn)
        self._cleanup(functions)
        self._drain()
        self._spawn("forget intents", lambda: self._forget_intents(functions))

    def _restarts(self, fn: Function) -> Restarts:
        """Counts the revision's FAILED instances and says what may start; in a crash loop the
        function is marked FAILED with the last reason."""
        key, now = keys.snapshot_id(fn.id, fn.revision), time.monotonic()
        last: Instance | None = None
        for inst in self.state.instances():
            if inst.function_id == fn.id and inst.revision == fn.revision \
                    and inst.state == InstanceState.INSTANCE_STATE_FAILED:
                if self.crashes.note(key, inst.id, now):
                    log.warning("instance failed: %s", inst.message.splitlines()[0] if inst.message else "no reason",
                                extra={"instance_id": inst.id, "function_id": fn.id})
                last = inst
        restarts = self.crashes.restarts(key, now)
        if restarts is Restarts.STOP:
            why = (f"revision {fn.revision}: {self.crashes.recent(key, now)} instances failed within "
                   f"{self.crashes.window_s:.0f}s, not restarted again; last: "
                   f"{last.message if last is not None else 'no reason given'}")
            self._spawn(f"crash loop {key}", lambda: self._fail_ready(fn, why))
        return restarts

    async def _fail_ready(self, fn: Function, why: str) -> None:
        def mutate(cur: Function) -> Function | None:
            if cur.revision != fn.revision or cur.state != FunctionState.FUNCTION_STATE_READY:
                return None
            cur.state, cur.status_message = FunctionState.FUNCTION_STATE_FAILED, why  # type: ignore[assignment]
            return cur

        await self.state.update_function(fn.id, mutate)
        log.warning("function FAILED: %s", why, extra={"function_id": fn.id})

    def _record_model(self, fn: Function) -> None:
        """Copies the model metadata an instance of ``fn``'s revision reported (its node read the
        model dir at start: the snapshot build, or the first start) onto the function, where the
        gateways read it. From the etcd mirror, so a new leader finishes what an old one missed."""
        if fn.HasField("model"):
            return
        model = next((i.model for i in self.state.instances()
                      if i.function_id == fn.id and i.revision == fn.revision and i.HasField("model")), None)
        if model is not None:
            self._spawn(f"model {fn.id}@{fn.revision}", lambda: self._write_model(fn, model))

    async def _write_model(self, fn: Function, model: ModelMetadata) -> None:
        def mutate(cur: Function) -> Function | None:
            if cur.revision != fn.revision or cur.HasField("model"):
                return None  # updated since, or recorded already
            cur.model.CopyFrom(model)
            return cur

        await self.state.update_function(fn.id, mutate)
        log.info("model of revision %d: context %d, vocabulary %d, chat template %s", fn.revision,
                 model.max_context_tokens, model.vocab_size, model.has_chat_template, extra={"function_id": fn.id})

    def _scale(self, fn: Function, start: bool = True) -> None:
        live = self.broker.live_count(fn)
        mine = [i for i in self.state.instances() if i.function_id == fn.id and i.revision == fn.revision]
        in_use = sum(self.broker.table.in_use(i.id) for i in mine)
        wanted = math.ceil((self.queues.total(fn.id) + in_use) / fn.spec.policy.concurrency)
        wanted = min(max(wanted, fn.spec.policy.min_instances), fn.spec.policy.max_instances)
        if live < wanted:
            if start:  # not while the revision's failures back off
                self.broker.ensure_start(fn)
            return
        idle_after = seconds(fn.spec.policy.idle_timeout)
        now = time.time()
        idle = sorted((i for i in mine if i.state == InstanceState.INSTANCE_STATE_IDLE and self.broker.table.in_use(i.id) == 0
                       and now - i.update_time.ToNanoseconds() / 1e9 > idle_after),
                      key=lambda i: i.update_time.ToNanoseconds())
        if idle and live > max(wanted, fn.spec.policy.min_instances):
            if self.starter.parkable(idle[0]):
                self._park(idle[0], f"idle for more than {idle_after:.0f}s")
            else:
                self._stop(idle[0], f"idle for more than {idle_after:.0f}s")

    def _standbys(self, fn: Function) -> None:
        per_node = fn.spec.policy.standby_per_node
        if not per_node or fn.spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_NONE:
            return
        now = time.monotonic()
        seen = {i.id for i in self.state.instances()}
        # A started standby counts from its start's answer until the watch shows it.
        self._standbys_started = {k: v for k, v in self._standbys_started.items()
                                  if k not in seen and now - v[1] < 30}
        self._standbys_deferred = {k: v for k, v in self._standbys_deferred.items() if v > now}
        tenant = quota.tenant_of(fn.id)
        room = self.starter.standby_room(tenant, sum(1 for k in self._ops if k.startswith(f"standby {tenant}/")))
        for node in self.state.nodes():
            if (fn.id, node.name) in self._standbys_deferred:
                continue
            have = {i.id for i in self.state.instances() if i.function_id == fn.id and i.revision == fn.revision
                    and i.node == node.name and i.state == InstanceState.INSTANCE_STATE_STANDBY}
            have |= {iid for iid, (n, _) in self._standbys_started.items() if n == node.name}
            # A serving instance parks back into a standby when it idles out, so it covers the
            # need: starting a fresh standby after every cold start would cost a container
            # start, a weight attach and a warm-up per request burst, the churn density dies of.
            # So does one being restored: the standby it was is about to serve (missing this
            # made the H100 density run start 46 fresh standbys and stop 34 idle instances that
            # could not park because of them).
            have |= {i.id for i in self.state.instances() if i.function_id == fn.id and i.revision == fn.revision
                     and i.node == node.name and (i.state in SERVING or i.state == InstanceState.INSTANCE_STATE_RESTORING)}
            key = f"standby {fn.id}@{fn.revision} on {node.name}"
            if len(have) < per_node and key not in self._ops:
                if room <= 0:  # every pass while the tenant stays there, hence debug
                    log.debug("no more standbys: tenant %s is at its standbys quota", tenant,
                              extra={"function_id": fn.id})
                    return
                room -= 1
                self._spawn(key, self._standby_op(fn, node.name))

    def _standby_op(self, fn: Function, node_name: str) -> Callable[[], Awaitable[None]]:
        return lambda: self._start_standby(fn, node_name)

    async def _start_standby(self, fn: Function, node_name: str) -> None:
        placement = None
        if fn.spec.resources.gpu_count:
            # A standby restores onto the GPU it was made on: spread them over the node's GPUs
            # (fewest standbys first), so the functions parked on one node can serve at once.
            placement = await self.starter.place(fn, {node_name}, self._emptiest_gpus(node_name))
        if placement is None:
            placement = await self.starter.place(fn, {node_name})
        if placement is None:
            return
        try:
            inst = await self.starter.start_target(fn, placement.node, placement.gpu_index,
                                                   StartTarget.START_TARGET_STANDBY)
        except NodeFull as exc:
            self._standbys_deferred[(fn.id, node_name)] = time.monotonic() + _STANDBY_BACKOFF_S
            log.info("no standby on %s for %.0fs: %s", node_name, _STANDBY_BACKOFF_S, exc.message,
                     extra={"function_id": fn.id})
            return
        self._standbys_started[inst.id] = (node_name, time.monotonic())

    def _emptiest_gpus(self, node_name: str) -> frozenset[tuple[str, int]] | None:
        node = self.state.node(node_name)
        if node is None or not node.gpus:
            return None
        count = dict.fromkeys((g.index for g in node.gpus), 0)
        starting = [i for i in self.starter.pending.values() if i.state == InstanceState.INSTANCE_STATE_CREATING]
        for i in [*self.state.instances(), *starting]:
            if i.node == node_name and i.gpu_index in count and i.state in (
                    InstanceState.INSTANCE_STATE_STANDBY, InstanceState.INSTANCE_STATE_CREATING):
                count[i.gpu_index] += 1
        least = min(count.values())
        return frozenset((node_name, idx) for idx, n in count.items() if n == least)

    def _cleanup(self, functions: dict[str, Function]) -> None:
        for inst in self.state.instances():
            fn = functions.get(inst.function_id)
            stale = fn is None or inst.revision < fn.revision
            if stale and inst.state in LIVE and self.broker.table.in_use(inst.id) == 0 \
                    and not self._bridging(fn, inst):
                self._stop(inst, "its function was deleted" if fn is None else "old revision, drained")

    async def _forget_intents(self, functions: dict[str, Function]) -> None:
        await self.forget_intents(functions, time.time())

    async def forget_intents(self, functions: dict[str, Function], now: float) -> int:
        """Deletes the intents no instance record needs any more (see ``INTENT_GRACE_S``);
        returns how many went."""
        recorded = {i.id for i in self.state.instances()} | set(self.starter.pending)
        gone = 0
        for intent, rev in list(self.state.mirrors["intents"].items.values()):
            assert isinstance(intent, Instance)
            fn = functions.get(intent.function_id)
            timeout = seconds(fn.spec.policy.start_timeout) if fn is not None else 0.0
            age = now - intent.create_time.ToNanoseconds() / 1e9
            if intent.id not in recorded and age > timeout + INTENT_GRACE_S \
                    and await self.state.forget_intent(intent, rev):
                log.info("forgot the intent of %s on %s: no node records it", intent.id, intent.node,
                         extra={"instance_id": intent.id})
                gone += 1
        return gone

    def _drain(self) -> None:
        every = self.state.instances()
        moved = {i.function_id for i in every if i.state in SERVING and not self.state.draining(i.node)}
        for inst in every:
            if not self.state.draining(inst.node) or self.broker.table.in_use(inst.id):
                continue
            fn = self.state.function(inst.function_id)
            unwanted = fn is None or (not fn.spec.policy.min_instances and not self.queues.total(fn.id))
            if inst.state == InstanceState.INSTANCE_STATE_STANDBY or (
                    inst.state in SERVING and (inst.function_id in moved or unwanted)):
                self._stop(inst, f"node {inst.node} is being drained")

    def _bridging(self, fn: Function | None, inst: Instance) -> bool:
        """An old-revision instance that keeps serving until its function's new revision has an
        instance up (the broker grants claims on it meanwhile): while the new snapshot is being
        built, or while ``min_instances`` asks for one that is starting. Not past ``idle_timeout``
        idle."""
        if fn is None or inst.state not in SERVING:
            return False
        if fn.state != FunctionState.FUNCTION_STATE_PENDING and not (
                fn.state == FunctionState.FUNCTION_STATE_READY and fn.spec.policy.min_instances > 0):
            return False
        if any(i.function_id == fn.id and i.revision == fn.revision and i.state in SERVING
               for i in self.state.instances()):
            return False
        idle_s = time.time() - inst.update_time.ToNanoseconds() / 1e9
        return not (inst.state == InstanceState.INSTANCE_STATE_IDLE and idle_s > seconds(fn.spec.policy.idle_timeout))

    def _park(self, inst: Instance, why: str) -> None:
        node = self.state.node(inst.node)
        if node is None or self.broker.table.in_use(inst.id):
            return
        log.info("parking as a standby: %s", why, extra={"instance_id": inst.id})
        # _spawn runs one park per instance at a time; a repeat after it finished (the watch
        # still showed IDLE) gets FAILED_PRECONDITION from the node and is ignored.
        self._spawn(f"park {inst.id}", lambda: self.starter.park(node, inst))

    def _stop(self, inst: Instance, why: str) -> None:
        node = self.state.node(inst.node)
        if node is None:
            return
        if not self.broker.table.retire(inst.id):
            return  # a claim went out since the decision: it is not idle any more
        log.info("stopping: %s", why, extra={"instance_id": inst.id})
        self._spawn(f"stop {inst.id}", lambda: self.starter.nodes.stop(node, inst.id))
