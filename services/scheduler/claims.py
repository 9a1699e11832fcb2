"""AcquireClaim: hand a gateway one slot of an instance, starting one if needed.

Decision order per attempt: (a) a RUNNING/IDLE instance of the current revision with a free
slot, least loaded first; (b)/(c) otherwise one shared start per function (restore a standby,
else a normal start; see ``starter``) unless ``max_instances`` are up; (d) otherwise wait
until a claim is released or an instance becomes ready. Concurrent waiters share the start:
if it fails, every one of them gets ``StartFailed`` with the reason at once.

A new leader knows no claims until the gateways report the ones they hold (``report``), so
for ``settle``'s grace window after an election nothing is granted or started: requests wait
(within their deadline) until the reports are in and ``free`` counts the adopted claims. A
request still waiting when leadership changes (``reset``) is answered Unavailable at once, so
its gateway asks the new leader instead of waiting out its deadline here.

Instances on a node being drained (``ClusterState.draining``) do not count towards
``live_count``, so their replacements start elsewhere while they still serve; they get new
claims only while their function has no usable instance off such nodes (make before break).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from services.scheduler.claimtable import Adoption, Claim, ClaimTable
from services.scheduler.spec import seconds
from services.scheduler.starter import Starter, StartResult
from services.scheduler.state import ClusterState
from snapwake import errors, keys, telemetry
from snapwake.imageref import is_builtin
from snapwake.lifecycle import COUNTED, GONE, SERVING
from snapwake.v1.scheduler_pb2 import ClaimSource, HeldClaim
from snapwake.v1.types_pb2 import Function, FunctionState, Instance

__all__ = ["ClaimBroker", "Grant", "QueueDepths"]

log = logging.getLogger(__name__)
# After "no capacity", wait this long (or for a change) before trying to place again.
_NO_ROOM_BACKOFF_S = 0.5
_SUSPECT_S = 10.0


@dataclass(frozen=True)
class Grant:
    claim: Claim
    instance: Instance
    source: ClaimSource
    wait_s: float


class QueueDepths:
    """Latest queue depth per gateway and function; reports older than ``stale_s`` are ignored."""

    def __init__(self, clock: Callable[[], float], stale_s: float = 15.0) -> None:
        self.clock, self.stale_s = clock, stale_s
        self._reports: dict[str, tuple[dict[str, int], float]] = {}

    def report(self, gateway_id: str, depths: dict[str, int]) -> None:
        self._reports[gateway_id] = (dict(depths), self.clock())

    def total(self, function_id: str) -> int:
        now = self.clock()
        return sum(d.get(function_id, 0) for d, at in self._reports.values() if now - at <= self.stale_s)


class ClaimBroker:
    def __init__(self, state: ClusterState, starter: Starter, table: ClaimTable) -> None:
        self.state, self.starter, self.table = state, starter, table
        self._events: dict[str, asyncio.Event] = {}
        self._starts: dict[str, asyncio.Task[StartResult | None]] = {}
        self._no_room_until: dict[str, float] = {}
        self._suspect: dict[str, float] = {}
        self._grants_from = 0.0  # monotonic time before which settle() holds grants back
        self._term = 0  # bumped by every reset(): a waiter from an earlier term gives up
        state.subscribe(self._on_change)

    # Wake-ups ---------------------------------------------------------------------------
    def _event(self, fid: str) -> asyncio.Event:
        return self._events.setdefault(fid, asyncio.Event())

    def wake(self, fid: str | None = None) -> None:
        for key in [fid] if fid else list(self._events):
            event = self._events.pop(key, None)
            if event is not None:
                event.set()

    def _on_change(self, key: str, value: Message | None) -> None:
        if isinstance(value, Instance):
            if value.state in GONE:
                self.table.drop_instance(value.id)
            self.wake(value.function_id)
        elif isinstance(value, Function):
            self.wake(value.id)
        else:
            # Only when no node records that instance any more: a record deleted under another
            # node's prefix must not drop the claims of the instance that runs.
            if value is None and (where := keys.split_instance_key(key)) is not None \
                    and self.state.instance(where[1]) is None:
                self.table.drop_instance(where[1])
            self.wake()

    # Decisions --------------------------------------------------------------------------
    def live_count(self, fn: Function) -> int:
        return sum(1 for i in self.state.instances()
                   if i.function_id == fn.id and i.revision == fn.revision and i.state in COUNTED
                   and not self.state.draining(i.node))

    def _try_warm(self, fn: Function, gateway_id: str) -> tuple[Claim, Instance] | None:
        now = time.monotonic()
        conc = fn.spec.policy.concurrency
        usable = [i for i in self.state.instances()
                  if i.function_id == fn.id and i.state in SERVING and i.endpoint
                  and self._suspect.get(i.id, 0.0) <= now]
        usable = [i for i in usable if not self.state.draining(i.node)] or usable
        # After UpdateFunction the old revision serves until the new one has an instance up
        # (its snapshot may still be building), so a rollout never stalls requests.
        ready = [i for i in usable if i.revision == fn.revision] or [i for i in usable if i.revision < fn.revision]
        for inst in sorted(ready, key=lambda i: (self.table.in_use(i.id), i.id)):
            claim = self.table.try_grant(inst.id, fn.id, gateway_id, conc)
            if claim is not None:
                return claim, inst
        return None

    def ensure_start(self, fn: Function) -> asyncio.Task[StartResult | None] | None:
        task = self._starts.get(fn.id)
        if task is not None:
            return task
        if self._no_room_until.get(fn.id, 0.0) > time.monotonic():
            return None
        if self.live_count(fn) >= fn.spec.policy.max_instances:
            return None
        task = asyncio.create_task(self._run_start(fn), name=f"start {fn.id}")
        task.add_done_callback(_log_failure)
        self._starts[fn.id] = task
        return task

    async def _run_start(self, fn: Function) -> StartResult | None:
        try:
            result = await self.starter.start(fn)
            if result is None:
                self._no_room_until[fn.id] = time.monotonic() + _NO_ROOM_BACKOFF_S
            return result
        finally:
            self._starts.pop(fn.id, None)
            self.wake(fn.id)

    def settle(self, grace_s: float) -> None:
        """Grants and starts nothing for ``grace_s`` (after an election): the gateways' reports
        of claims held from the last term come in meanwhile."""
        self._grants_from = time.monotonic() + grace_s

    def settling_s(self) -> float:
        """Seconds left of the grace window ``settle`` opened; 0 once grants flow."""
        return max(0.0, self._grants_from - time.monotonic())

    def report(self, gateway_id: str, held: Sequence[HeldClaim]) -> dict[str, Adoption]:
        """Takes one gateway's list of the claims it holds: known ones live on, unknown ones on
        live instances are adopted, and its earlier-reported ones left out are released.

        The whole report is refused, before anything changes, if it lists a claim another
        gateway holds (``PermissionDenied``) or a claim of a function that does not exist and
        that this gateway did not hold here before (``NotFound``; a claim whose function was
        deleted while its request ran was dropped with its instance and is remembered)."""
        self._check_report(gateway_id, held)
        outcomes: dict[str, Adoption] = {}
        for h in held:
            inst = self.state.instance(h.instance_id)
            if inst is None or inst.state in GONE or inst.function_id != h.function_id:
                continue  # nothing left to count it against
            outcome = outcomes[h.claim_id] = self.table.adopt(h.claim_id, h.instance_id, h.function_id, gateway_id)
            if outcome is Adoption.ADOPTED:
                log.info("adopted claim %s of gateway %s", h.claim_id, gateway_id,
                         extra={"instance_id": h.instance_id})
        for claim in self.table.drop_unreported(gateway_id, {h.claim_id for h in held}):
            log.info("claim %s left out of gateway %s's report; released", claim.claim_id, gateway_id,
                     extra={"instance_id": claim.instance_id})
            self.wake(claim.function_id)
        return outcomes

    def _check_report(self, gateway_id: str, held: Sequence[HeldClaim]) -> None:
        for n, h in enumerate(held):
            known = self.table.get(h.claim_id)
            if known is not None and known.gateway_id != gateway_id:
                log.warning("gateway %s reported claim %s, which another gateway holds; refused",
                            gateway_id, h.claim_id)
                raise errors.PermissionDenied(f"claims[{n}]: claim {h.claim_id} is held by another gateway",
                                              field=f"claims[{n}].claim_id")
            if known is None and self.state.function(h.function_id) is None \
                    and not self.table.was_released(gateway_id, h.claim_id):
                raise errors.NotFound(f"claims[{n}]: claim {h.claim_id} names function {h.function_id}, "
                                      "which does not exist", field=f"claims[{n}].function_id")

    @telemetry.traced("claim")
    async def acquire(self, function_id: str, gateway_id: str, timeout_s: float) -> Grant:
        """Blocks up to ``min(timeout_s, queue_timeout)`` for a claim."""
        began, term = time.monotonic(), self._term
        fn = self._function(function_id)
        deadline = began + min(timeout_s, seconds(fn.spec.policy.queue_timeout))
        while True:
            if term != self._term:
                raise errors.Unavailable("leadership changed while the request waited; ask the leader again")
            fn = self._function(function_id)
            task = None
            settling = self.settling_s()
            if not settling and fn.state in (FunctionState.FUNCTION_STATE_READY,
                                             FunctionState.FUNCTION_STATE_PENDING):
                got = self._try_warm(fn, gateway_id)
                if got is not None:
                    claim, inst = got
                    if inst.revision != fn.revision and fn.state == FunctionState.FUNCTION_STATE_READY:
                        self.ensure_start(fn)  # bring the new revision up; the old one drains then
                    # A waiter that began before this instance's start ended waited for it.
                    how, ended = self.starter.origin.get(inst.id, (ClaimSource.CLAIM_SOURCE_WARM, 0.0))
                    source = how if ended >= began else ClaimSource.CLAIM_SOURCE_WARM
                    return Grant(claim, inst, source, time.monotonic() - began)
            if not settling and fn.state == FunctionState.FUNCTION_STATE_READY:
                task = self.ensure_start(fn)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                building = "snapshot is still being built" if is_builtin(fn.spec.image) \
                    else "image is still being validated on a node"
                why = f" (its {building})" if fn.state == FunctionState.FUNCTION_STATE_PENDING else ""
                why = " (a new leader is collecting the gateways' claims)" if settling else why
                raise errors.DeadlineExceeded(
                    f"no instance of {function_id} became free within {time.monotonic() - began:.1f}s{why}")
            await self._wait(fn.id, task, min(remaining, _NO_ROOM_BACKOFF_S * 4, settling or math.inf,
                                              self._until_expiry(fn.id)))

    def _until_expiry(self, fid: str) -> float:
        """Seconds until one of ``fid``'s claims expires (its gateway went quiet): a slot frees then."""
        at = self.table.next_expiry(fid)
        return math.inf if at is None else max(0.01, at - self.table.clock())

    async def _wait(self, fid: str, task: asyncio.Task[StartResult | None] | None, bound_s: float) -> None:
        event = self._event(fid)
        waiter = asyncio.ensure_future(event.wait())
        pending = {waiter} | ({task} if task is not None else set())
        try:
            await asyncio.wait(pending, timeout=bound_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if task is not None and task.done():
            task.result()  # raises StartFailed for every waiter sharing this start

    def _function(self, function_id: str) -> Function:
        fn = self.state.function(function_id)
        if fn is None:
            raise errors.NotFound(f"function {function_id} does not exist", field="function_id")
        if fn.state == FunctionState.FUNCTION_STATE_FAILED:
            raise errors.FailedPrecondition(f"function {function_id} failed: {fn.status_message}")
        return fn

    def release(self, claim_id: str, gateway_id: str, instance_failed: bool) -> Claim | None:
        """Returns ``gateway_id``'s claim; None if it is not held here (released, expired, or
        granted by an earlier leader and not reported yet). ``PermissionDenied`` if another
        gateway holds it: that one's request is still in flight."""
        known = self.table.get(claim_id)
        if known is not None and known.gateway_id != gateway_id:
            log.warning("gateway %s tried to release claim %s of another gateway; refused", gateway_id, claim_id,
                        extra={"instance_id": known.instance_id})
            raise errors.PermissionDenied(f"claim {claim_id} is held by another gateway", field="claim_id")
        claim = self.table.release(claim_id, gateway_id)
        if claim is None:
            return None
        if instance_failed:
            log.warning("gateway reports instance failed; granting no claims on it for %.0fs", _SUSPECT_S,
                        extra={"instance_id": claim.instance_id})
            self._suspect[claim.instance_id] = time.monotonic() + _SUSPECT_S
        self.wake(claim.function_id)
        return claim

    def reset(self) -> None:
        """Forgets soft state (on losing or gaining leadership)."""
        self._term += 1
        self.table.clear()
        for task in self._starts.values():
            task.cancel()
        self._starts.clear()
        self.wake()


def _log_failure(task: asyncio.Task[StartResult | None]) -> None:
    # Retrieves the outcome so a start nobody waited for (the autoscaler's) is logged once.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("%s failed: %s", task.get_name(), exc)
