"""The bounded per-function request queue.

``QueueBook`` is the pure core: how many requests wait per function, and whether one more may.
``ClaimQueue`` is its asyncio edge: a request takes a slot (or is refused with 429), then a
worker task asks the scheduler for a claim with the deadline that is left of the function's
``queue_timeout`` (503 when it runs out). The OpenTelemetry context is captured at enqueue time
and attached in the worker, so the claim span sits under the request's trace. Every claim
acquired and not yet released is listed in the periodic report, so a newly elected scheduler
counts it too, and the scheduler keeps it only while the reports list it: the report period is
kept to at most a third of the claims' TTL, so one or two lost reports never cost a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from services.gateway.errors import QueueFull, QueueTimeout
from services.gateway.scheduler_client import Claim, FunctionInfo, HeldClaim, SchedulerClient
from snapwake import errors, telemetry

try:
    from opentelemetry import context as otel_context
except ImportError:  # tracing is optional
    otel_context = None  # type: ignore[assignment]

__all__ = ["Admission", "ClaimQueue", "QueueBook"]

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    ADMITTED = "admitted"  # the request holds a slot; it must leave() when it stops waiting
    FULL = "full"  # queue_len requests already wait: answer 429 with Retry-After


class QueueBook:
    """Waiting requests per function (pure, synchronous)."""

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}

    def enter(self, function_id: str, limit: int) -> Admission:
        """Takes a slot unless ``limit`` requests already wait."""
        if self._waiting.get(function_id, 0) >= limit:
            return Admission.FULL
        self._waiting[function_id] = self._waiting.get(function_id, 0) + 1
        return Admission.ADMITTED

    def leave(self, function_id: str) -> None:
        """Gives the slot back (claim acquired, timed out, failed or cancelled)."""
        left = self._waiting.get(function_id, 0) - 1
        if left < 0:
            raise RuntimeError(f"leave() without enter() for {function_id}")
        self._waiting[function_id] = left

    def depth(self, function_id: str) -> int:
        return self._waiting.get(function_id, 0)

    def depths(self) -> dict[str, int]:
        """Every function seen since the last ``prune``, zeros included (a drop to 0 is news)."""
        return dict(self._waiting)

    def prune(self) -> None:
        """Forgets functions with nobody waiting (after their 0 has been reported)."""
        self._waiting = {f: n for f, n in self._waiting.items() if n}


class ClaimQueue:
    """Queues requests per function and gets each one a claim from the scheduler."""

    def __init__(self, client: SchedulerClient, default_len: int, default_timeout: float,
                 on_depth: Callable[[str, int], None] = lambda f, n: None) -> None:
        self._client = client
        self._book = QueueBook()
        self._default_len, self._default_timeout = default_len, default_timeout
        self._on_depth = on_depth
        self._background: set[asyncio.Task[Any]] = set()
        self._held: dict[str, HeldClaim] = {}  # acquired, not yet released
        self._releasing: dict[str, asyncio.Task[None]] = {}  # ReleaseClaim calls under way
        self._reported_held = False  # the last report listed claims: the next must say if they went
        self._claim_ttl = 0.0  # the shortest TTL the scheduler gave a claim (0: none said)

    def limits(self, fn: FunctionInfo) -> tuple[int, float]:
        """The function's (queue_len, queue_timeout), with the gateway's defaults for zeros."""
        return fn.queue_len or self._default_len, fn.queue_timeout or self._default_timeout

    async def acquire(self, fn: FunctionInfo, request_id: str) -> Claim:
        """Waits in ``fn``'s queue for a claim. Raises ``QueueFull`` (429), ``QueueTimeout``
        (503), ``StartFailed`` (503, at once) or the scheduler's error."""
        limit, timeout = self.limits(fn)
        if self._book.enter(fn.function_id, limit) is Admission.FULL:
            raise QueueFull(f"{limit} requests already wait for {fn.function_id}; retry later")
        self._on_depth(fn.function_id, self._book.depth(fn.function_id))
        captured = otel_context.get_current() if otel_context else None
        worker = self._spawn(self._claim(fn.function_id, request_id, timeout, captured))
        try:
            done, _ = await asyncio.wait({worker}, timeout=timeout)
        except asyncio.CancelledError:  # the client went away
            self._abandon(worker)
            raise
        finally:
            self._book.leave(fn.function_id)
            self._on_depth(fn.function_id, self._book.depth(fn.function_id))
        if not done:
            self._abandon(worker)
            raise QueueTimeout(f"no instance of {fn.function_id} became free within {timeout:g}s")
        try:
            return worker.result()
        except errors.DeadlineExceeded as exc:
            raise QueueTimeout(f"no instance of {fn.function_id} became free within {timeout:g}s: "
                               f"{exc.message}") from None

    async def _claim(self, function_id: str, request_id: str, max_wait: float, captured: Any) -> Claim:
        token = otel_context.attach(captured) if otel_context and captured is not None else None
        try:
            async with telemetry.traced("claim.acquire", attributes={"snapwake.function_id": function_id}):
                claim = await self._client.acquire_claim(function_id, request_id, max_wait)
                self._held[claim.claim_id] = HeldClaim(claim.claim_id, claim.instance_id, function_id)
                if claim.ttl_seconds > 0:
                    self._claim_ttl = min(self._claim_ttl or claim.ttl_seconds, claim.ttl_seconds)
                return claim
        finally:
            if token is not None:
                otel_context.detach(token)

    def _abandon(self, worker: asyncio.Task[Claim]) -> None:
        """Cancels a worker; a claim that arrives anyway is released, never leaked."""
        def release_late(task: asyncio.Task[Claim]) -> None:
            if not task.cancelled() and task.exception() is None:
                self.release(task.result())
        worker.add_done_callback(release_late)
        worker.cancel()

    def release(self, claim: Claim, instance_failed: bool = False) -> None:
        """Returns a claim in the background: cancellation of the request must not skip it."""
        self._held.pop(claim.claim_id, None)  # not reported from now on, even if the RPC fails
        task = self._releasing[claim.claim_id] = self._spawn(self._release(claim, instance_failed))
        task.add_done_callback(lambda _: self._releasing.pop(claim.claim_id, None))

    async def released(self, claim: Claim, limit_s: float) -> None:
        """Waits, at most ``limit_s``, until the release of ``claim`` reached the scheduler (or failed)."""
        task = self._releasing.get(claim.claim_id)
        if task is not None:
            await asyncio.wait({task}, timeout=limit_s)

    async def _release(self, claim: Claim, instance_failed: bool) -> None:
        try:
            await self._client.release_claim(claim.claim_id, instance_failed)
        except errors.NotFound as exc:  # it expired, or a report already released it
            log.info("ReleaseClaim %s: %s", claim.claim_id, exc.message)
        except errors.SnapwakeError as exc:  # the claim's TTL reclaims it
            log.warning("ReleaseClaim %s failed: %s", claim.claim_id, exc.message)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def report_forever(self, interval: float) -> None:
        """Sends queue depths and held claims to the scheduler every ``interval`` seconds until
        cancelled (more often while the claims' TTL is under 3 periods); the scheduler's grace
        after an election assumes this period."""
        while True:
            await asyncio.sleep(self.report_period(interval))
            depths, held = self._book.depths(), list(self._held.values())
            if not depths and not held and not self._reported_held:
                continue
            try:
                await self._client.report_queue(depths, held)
            except errors.SnapwakeError as exc:
                log.warning("ReportQueue failed: %s", exc.message)
                continue
            self._reported_held = bool(held)
            self._book.prune()

    def report_period(self, interval: float) -> float:
        """``interval``, or a third of the claims' TTL if that is shorter."""
        return min(interval, self._claim_ttl / 3) if self._claim_ttl else interval

    def held(self) -> list[HeldClaim]:
        """Claims acquired and not yet released, as the next report lists them."""
        return list(self._held.values())

    def depths(self) -> Mapping[str, int]:
        return self._book.depths()

    async def drain(self, grace: float = 5.0) -> None:
        """Waits (bounded) for background releases to finish."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
