"""What the gateway needs from the scheduler, and its gRPC implementation.

``SchedulerClient`` is the interface ``serving`` depends on; ``GrpcSchedulerClient`` talks to
``snapwake.v1.SchedulerService`` and ``ClaimService``. With several scheduler addresses only the
elected leader answers; the others say UNAVAILABLE "not the leader", and the client moves on to
the next address and remembers the one that answered. Every call goes through
``snapwake.grpcclient.call``, so failures arrive here as ``snapwake.errors``.

While no scheduler leads, calls wait for one, but only ``leader_wait`` seconds counted from the
first call that found none: an election takes about the election TTL, while etcd without quorum
leaves every scheduler without a lease for as long as it lasts. Past that bound each call makes
one round over the addresses and fails with Unavailable (the gateway's 503 with Retry-After) at
once, until a leader answers again. A request therefore hears 503 at most ``leader_wait`` after
the leader stepped down (``services.scheduler.election``), never after its whole queue timeout.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from snapwake import errors
from snapwake.grpcclient import call, channel
from snapwake.imageref import is_builtin
from snapwake.openai import ModelLimits
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

__all__ = ["Claim", "ClaimSource", "FunctionInfo", "GrpcSchedulerClient", "HeldClaim", "SchedulerClient"]

log = logging.getLogger(__name__)
R = TypeVar("R")
# Pause between rounds over every address while none leads (an election is under way).
_NO_LEADER_PAUSE_S = 0.2


class ClaimSource(enum.Enum):
    """How the claimed instance came to serve the request (mirrors ``snapwake.v1.ClaimSource``)."""

    UNSPECIFIED = 0
    WARM = 1  # a running or idle instance with free concurrency
    COLD_START = 2  # a standby restored from its snapshot
    NORMAL_START = 3  # a container started from scratch

    @property
    def started(self) -> bool:
        """True when the request waited for an instance start (these feed the CS-TTFT metric)."""
        return self in (ClaimSource.COLD_START, ClaimSource.NORMAL_START)


@dataclass(frozen=True)
class Claim:
    """One instance, claimed for one request; always released."""

    claim_id: str
    instance_id: str
    endpoint: str  # host:port of the instance's OpenAI server
    source: ClaimSource = ClaimSource.WARM
    wait_seconds: float = 0.0
    ttl_seconds: float = 0.0  # it expires unless reported within this long; 0: not said


@dataclass(frozen=True)
class HeldClaim:
    """A claim this gateway holds, as reported to the scheduler (a new leader adopts it)."""

    claim_id: str
    instance_id: str
    function_id: str


@dataclass(frozen=True)
class FunctionInfo:
    """What the gateway needs of a deployed function."""

    function_id: str  # tenant/namespace/name
    queue_len: int  # 0: the gateway's default
    queue_timeout: float  # seconds; 0: the gateway's default
    state: types_pb2.FunctionState = types_pb2.FUNCTION_STATE_READY
    status_message: str = ""
    created_unix: int = 0
    image: str = ""  # FunctionSpec.image; "" or "builtin" is the built-in model server
    served_model_name: str = ""  # FunctionSpec.served_model_name: a user image's own model name
    limits: ModelLimits | None = None  # from Function.model; None until an instance reported it

    @property
    def tenant(self) -> str:
        return self.function_id.split("/", 1)[0]

    @property
    def builtin(self) -> bool:
        """Served by the built-in model server, whose request schema the gateway applies."""
        return is_builtin(self.image)

    @classmethod
    def from_proto(cls, fn: types_pb2.Function) -> FunctionInfo:
        policy = fn.spec.policy
        return cls(function_id=fn.id, queue_len=policy.queue_len,
                   queue_timeout=policy.queue_timeout.ToTimedelta().total_seconds(),
                   state=fn.state, status_message=fn.status_message, created_unix=fn.create_time.seconds,
                   image=fn.spec.image, served_model_name=fn.spec.served_model_name,
                   limits=ModelLimits.from_proto(fn.model) if fn.HasField("model") else None)


class SchedulerClient(abc.ABC):
    """The scheduler, as the gateway sees it. Every method is bounded by a deadline."""

    @abc.abstractmethod
    async def list_functions(self) -> list[FunctionInfo]:
        """Every deployed function, of every tenant, whether or not an instance runs."""

    @abc.abstractmethod
    async def acquire_claim(self, function_id: str, request_id: str, max_wait: float) -> Claim:
        """Blocks up to ``max_wait`` seconds for an instance. Raises ``StartFailed`` when its
        start failed, ``DeadlineExceeded`` on timeout, ``NotFound`` for an unknown function."""

    @abc.abstractmethod
    async def release_claim(self, claim_id: str, instance_failed: bool = False) -> None:
        """Returns the claim; ``instance_failed`` asks the scheduler to check the instance."""

    @abc.abstractmethod
    async def report_queue(self, depths: Mapping[str, int], claims: Sequence[HeldClaim] = ()) -> None:
        """Reports waiting requests per function id (the autoscaler's input) and every claim
        held (the leader's count of them survives a failover)."""

    async def fetch_api_keys(self) -> list[tuple[str, str, str]]:
        """``(id, tenant, hmac hex)`` of every API key made through the admin API
        (``services.gateway.keys.ApiKeyTable``); none by default."""
        return []

    async def close(self) -> None:  # noqa: B027 - an optional hook; most fakes hold nothing
        """Releases connections."""


class GrpcSchedulerClient(SchedulerClient):
    """``SchedulerClient`` over gRPC, with leader failover across ``addresses``."""

    def __init__(self, addresses: Sequence[str], gateway_id: str, rpc_timeout: float = 5.0,
                 leader_wait: float = 10.0, admin_token: str = "", tls: ClientTls | None = None) -> None:
        """``admin_token``: the bearer token sent on SchedulerService calls (the function list
        and the dashboard's lists) when the scheduler requires one. ``tls``: the gateway's
        certificate, for the schedulers' mutual-TLS port; None: plaintext."""
        if not addresses:
            raise errors.InvalidArgument("at least one scheduler address is required", field="scheduler")
        self._channels = [channel(a, tls, server_role="scheduler") for a in addresses]
        self._addresses = list(addresses)
        self._admin = [scheduler_pb2_grpc.SchedulerServiceStub(c) for c in self._channels]
        self._claims = [scheduler_pb2_grpc.ClaimServiceStub(c) for c in self._channels]
        self._current = 0
        self._gateway_id = gateway_id
        self._rpc_timeout = rpc_timeout
        self._leader_wait = leader_wait
        self._leaderless_since: float | None = None  # monotonic; None while a leader answers
        self._admin_metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else None

    async def _call(self, invoke: Callable[[int, float], Awaitable[R]], budget: float) -> R:
        """Runs ``invoke(index, remaining)`` on the leader, trying each address in turn.

        While no address leads (the leader died and its election lease has not run out yet),
        the round is repeated after a short pause until ``budget`` is spent, or ``leader_wait``
        since calls first found no leader (module docstring): a failover delays requests by the
        election gap instead of failing them with 503, an outage fails them within the bound.
        """
        deadline = time.monotonic() + budget
        last: errors.Unavailable | None = None
        while True:
            for step in range(len(self._addresses)):
                index = (self._current + step) % len(self._addresses)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    result = await invoke(index, remaining)
                except errors.Unavailable as err:
                    # A follower answers "not the leader"; an address that is down answers
                    # UNAVAILABLE too. Both mean: try the next address. A StartFailed (not an
                    # Unavailable) is final, as is every other error.
                    log.info("scheduler %s unavailable (%s); trying the next", self._addresses[index],
                             err.message)
                    last = err
                    continue
                self._current, self._leaderless_since = index, None
                return result
            now = time.monotonic()
            if last is not None and self._leaderless_since is None:
                self._leaderless_since = now
            give_up = deadline if self._leaderless_since is None else \
                min(deadline, self._leaderless_since + self._leader_wait)
            if give_up - now <= _NO_LEADER_PAUSE_S:
                break
            await asyncio.sleep(_NO_LEADER_PAUSE_S)
        if last is not None:
            raise errors.Unavailable(f"no scheduler leader reachable at {', '.join(self._addresses)}: "
                                     f"{last.message}")
        raise errors.DeadlineExceeded("scheduler call ran out of time")

    async def list_functions(self) -> list[FunctionInfo]:
        return [FunctionInfo.from_proto(f) for f in await self.list_function_records()]

    # The admin lists below feed the dashboard; they return the scheduler's records as they are.

    async def list_function_records(self) -> list[types_pb2.Function]:
        """Every deployed function, as the scheduler's ``Function`` records."""
        async def invoke(i: int, t: float) -> Any:
            return await call(functools.partial(self._admin[i].ListFunctions, metadata=self._admin_metadata),
                              scheduler_pb2.ListFunctionsRequest(), timeout=t)

        return list((await self._call(invoke, self._rpc_timeout)).functions)

    async def list_instances(self) -> list[types_pb2.Instance]:
        """Every instance of every function, in any state."""
        async def invoke(i: int, t: float) -> Any:
            return await call(functools.partial(self._admin[i].ListInstances, metadata=self._admin_metadata),
                              scheduler_pb2.ListInstancesRequest(), timeout=t)

        return list((await self._call(invoke, self._rpc_timeout)).instances)

    async def list_nodes(self) -> list[types_pb2.Node]:
        """Every registered node with its GPUs and cached snapshots."""
        async def invoke(i: int, t: float) -> Any:
            return await call(functools.partial(self._admin[i].ListNodes, metadata=self._admin_metadata),
                              scheduler_pb2.ListNodesRequest(), timeout=t)

        return list((await self._call(invoke, self._rpc_timeout)).nodes)

    async def list_snapshots(self) -> list[types_pb2.Snapshot]:
        """Every snapshot record, with where it is stored."""
        async def invoke(i: int, t: float) -> Any:
            return await call(functools.partial(self._admin[i].ListSnapshots, metadata=self._admin_metadata),
                              scheduler_pb2.ListSnapshotsRequest(), timeout=t)

        return list((await self._call(invoke, self._rpc_timeout)).snapshots)

    async def acquire_claim(self, function_id: str, request_id: str, max_wait: float) -> Claim:
        request = scheduler_pb2.AcquireClaimRequest(function_id=function_id, request_id=request_id,
                                                    gateway_id=self._gateway_id)

        async def invoke(i: int, t: float) -> Any:
            return await call(self._claims[i].AcquireClaim, request, timeout=t)

        r = await self._call(invoke, max_wait)
        return Claim(claim_id=r.claim_id, instance_id=r.instance_id, endpoint=r.endpoint,
                     source=ClaimSource(r.source) if r.source in ClaimSource._value2member_map_
                     else ClaimSource.UNSPECIFIED,
                     wait_seconds=r.wait.ToTimedelta().total_seconds(),
                     ttl_seconds=r.ttl.ToTimedelta().total_seconds())

    async def release_claim(self, claim_id: str, instance_failed: bool = False) -> None:
        request = scheduler_pb2.ReleaseClaimRequest(claim_id=claim_id, instance_failed=instance_failed,
                                                    gateway_id=self._gateway_id)

        async def invoke(i: int, t: float) -> Any:
            return await call(self._claims[i].ReleaseClaim, request, timeout=t)

        await self._call(invoke, self._rpc_timeout)

    async def report_queue(self, depths: Mapping[str, int], claims: Sequence[HeldClaim] = ()) -> None:
        held = [scheduler_pb2.HeldClaim(claim_id=h.claim_id, instance_id=h.instance_id, function_id=h.function_id)
                for h in claims]
        request = scheduler_pb2.ReportQueueRequest(gateway_id=self._gateway_id, depths=dict(depths), claims=held)

        async def invoke(i: int, t: float) -> Any:
            return await call(self._claims[i].ReportQueue, request, timeout=t)

        await self._call(invoke, self._rpc_timeout)

    async def fetch_api_keys(self) -> list[tuple[str, str, str]]:
        async def invoke(i: int, t: float) -> Any:
            return await call(self._claims[i].SyncApiKeys, scheduler_pb2.SyncApiKeysRequest(), timeout=t)

        return [(k.id, k.tenant, k.hmac_sha256) for k in (await self._call(invoke, self._rpc_timeout)).keys]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()
