"""``InMemoryScheduler``: a ``SchedulerClient`` that hands out claims on fixed endpoints.

It sits beside the gRPC client the way httpx's ``MockTransport`` sits beside its transports:
for in-process tests of the gateway and for running the gateway against a local OpenAI server
without a cluster. It honours ``concurrency`` per endpoint and the caller's ``max_wait``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.gateway.scheduler_client import Claim, ClaimSource, FunctionInfo, HeldClaim, SchedulerClient
from snapwake import errors

__all__ = ["InMemoryScheduler"]


@dataclass
class _Deployment:
    info: FunctionInfo
    endpoints: list[str]
    concurrency: int
    source: ClaimSource
    start_error: str | None = None
    in_use: dict[str, int] = field(default_factory=dict)


class InMemoryScheduler(SchedulerClient):
    """Functions and their instance endpoints, kept in memory; records what the gateway did."""

    def __init__(self) -> None:
        self._deployments: dict[str, _Deployment] = {}
        self._claims: dict[str, tuple[str, str]] = {}  # claim id -> (function id, endpoint)
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self.acquired: list[str] = []  # function id of every AcquireClaim (each may start an instance)
        self.released: list[tuple[str, bool]] = []  # (claim id, instance_failed)
        self.reports: list[dict[str, int]] = []
        self.reported_claims: list[list[HeldClaim]] = []  # one list per report
        self.list_calls = 0
        self.release_delay = 0.0  # seconds each ReleaseClaim takes to arrive (a slow scheduler)

    def deploy(self, info: FunctionInfo, endpoints: list[str], concurrency: int = 1,
               source: ClaimSource = ClaimSource.WARM, start_error: str | None = None) -> None:
        """Adds or replaces a function; ``start_error`` makes every AcquireClaim a StartFailed."""
        self._deployments[info.function_id] = _Deployment(info, list(endpoints), concurrency, source,
                                                          start_error)

    def in_use(self, function_id: str) -> int:
        """Claims of ``function_id`` not yet released."""
        return sum(self._deployments[function_id].in_use.values())

    async def list_functions(self) -> list[FunctionInfo]:
        self.list_calls += 1
        return [d.info for d in self._deployments.values()]

    def _free(self, d: _Deployment) -> str | None:
        return next((e for e in d.endpoints if d.in_use.get(e, 0) < d.concurrency), None)

    async def acquire_claim(self, function_id: str, request_id: str, max_wait: float) -> Claim:
        self.acquired.append(function_id)
        d = self._deployments.get(function_id)
        if d is None:
            raise errors.NotFound(f"function {function_id} not found")
        if d.start_error is not None:
            raise errors.StartFailed(d.start_error)
        try:
            async with asyncio.timeout(max_wait), self._changed:
                await self._changed.wait_for(lambda: self._free(d) is not None)
                endpoint = self._free(d)
                assert endpoint is not None
                d.in_use[endpoint] = d.in_use.get(endpoint, 0) + 1
        except TimeoutError:
            raise errors.DeadlineExceeded(f"no free instance of {function_id}") from None
        claim_id = f"claim-{next(self._ids)}"
        self._claims[claim_id] = (function_id, endpoint)
        return Claim(claim_id, f"i-{abs(hash(endpoint)) % 16**12:012x}", endpoint, d.source)

    async def release_claim(self, claim_id: str, instance_failed: bool = False) -> None:
        await asyncio.sleep(self.release_delay)
        if claim_id not in self._claims:
            raise errors.NotFound(f"claim {claim_id} not found")
        function_id, endpoint = self._claims.pop(claim_id)
        self.released.append((claim_id, instance_failed))
        async with self._changed:
            d = self._deployments[function_id]
            d.in_use[endpoint] -= 1
            if instance_failed and endpoint in d.endpoints:  # as the scheduler would: stop routing to it
                d.endpoints.remove(endpoint)
            self._changed.notify_all()

    async def report_queue(self, depths: Mapping[str, int], claims: Sequence[HeldClaim] = ()) -> None:
        self.reports.append(dict(depths))
        self.reported_claims.append(list(claims))
