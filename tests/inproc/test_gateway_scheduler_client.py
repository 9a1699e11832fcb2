"""``GrpcSchedulerClient`` against real gRPC servers on port 0: leader failover, deadlines, and
the translation of gRPC statuses (StartFailed included) into ``snapwake.errors``.

The servicers here are the smallest stand-ins for the scheduler that speak its real proto.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2

from services.gateway.scheduler_client import ClaimSource, GrpcSchedulerClient
from snapwake import errors
from snapwake.grpcserver import GrpcServer
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

pytestmark = pytest.mark.timeout(30)


class Claims(scheduler_pb2_grpc.ClaimServiceServicer):
    def __init__(self, leader: bool) -> None:
        self.leader = leader
        self.released: list[scheduler_pb2.ReleaseClaimRequest] = []
        self.reports: list[scheduler_pb2.ReportQueueRequest] = []

    def _check(self) -> None:
        if not self.leader:
            raise errors.Unavailable("not the leader")

    async def AcquireClaim(self, request: scheduler_pb2.AcquireClaimRequest,
                           context: grpc.aio.ServicerContext) -> scheduler_pb2.AcquireClaimResponse:
        self._check()
        if request.function_id.endswith("/broken"):
            raise errors.StartFailed("runc exited 1")
        if request.function_id.endswith("/asleep"):
            await asyncio.sleep(context.time_remaining() + 1)
        return scheduler_pb2.AcquireClaimResponse(
            claim_id="c-1", instance_id="i-000000000001", endpoint="127.0.0.1:9",
            source=scheduler_pb2.CLAIM_SOURCE_COLD_START, wait=duration_pb2.Duration(nanos=250_000_000))

    async def ReleaseClaim(self, request: scheduler_pb2.ReleaseClaimRequest,
                           context: grpc.aio.ServicerContext) -> scheduler_pb2.ReleaseClaimResponse:
        self._check()
        self.released.append(request)
        return scheduler_pb2.ReleaseClaimResponse()

    async def ReportQueue(self, request: scheduler_pb2.ReportQueueRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.ReportQueueResponse:
        self._check()
        self.reports.append(request)
        return scheduler_pb2.ReportQueueResponse()


class Admin(scheduler_pb2_grpc.SchedulerServiceServicer):
    async def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest,
                            context: grpc.aio.ServicerContext) -> scheduler_pb2.ListFunctionsResponse:
        spec = types_pb2.FunctionSpec(tenant="acme", namespace="default", name="chat", policy=types_pb2.Policy(
            queue_len=3, queue_timeout=duration_pb2.Duration(seconds=12)))
        return scheduler_pb2.ListFunctionsResponse(functions=[types_pb2.Function(
            id="acme/default/chat", spec=spec, state=types_pb2.FUNCTION_STATE_READY)])


async def _server(claims: Claims) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", ["snapwake.v1.ClaimService", "snapwake.v1.SchedulerService"])
    scheduler_pb2_grpc.add_ClaimServiceServicer_to_server(claims, server.server)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(Admin(), server.server)
    await server.start()
    return server


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[GrpcSchedulerClient, Claims, Claims]]:
    follower, leader = Claims(leader=False), Claims(leader=True)
    servers = [await _server(follower), await _server(leader)]
    client = GrpcSchedulerClient([f"127.0.0.1:{s.port}" for s in servers], "gw-test", rpc_timeout=2)
    try:
        yield client, follower, leader
    finally:
        await client.close()
        for s in servers:
            await s.stop(0)


async def test_follower_is_skipped_and_calls_reach_the_leader(
        cluster: tuple[GrpcSchedulerClient, Claims, Claims]) -> None:
    client, follower, leader = cluster
    claim = await client.acquire_claim("acme/default/chat", "req-1", max_wait=2)
    assert (claim.claim_id, claim.endpoint, claim.source) == ("c-1", "127.0.0.1:9", ClaimSource.COLD_START)
    assert claim.wait_seconds == pytest.approx(0.25)
    await client.release_claim("c-1", instance_failed=True)
    await client.report_queue({"acme/default/chat": 4})
    assert [(r.claim_id, r.instance_failed) for r in leader.released] == [("c-1", True)]
    assert [(r.gateway_id, dict(r.depths)) for r in leader.reports] == [("gw-test", {"acme/default/chat": 4})]
    assert follower.released == [] and follower.reports == []


async def test_list_functions_reads_the_policy(cluster: tuple[GrpcSchedulerClient, Claims, Claims]) -> None:
    client, _, _ = cluster
    [fn] = await client.list_functions()
    assert (fn.function_id, fn.tenant, fn.queue_len, fn.queue_timeout) == ("acme/default/chat", "acme", 3, 12.0)


async def test_start_failed_is_translated_and_not_retried(
        cluster: tuple[GrpcSchedulerClient, Claims, Claims]) -> None:
    client, _, _ = cluster
    with pytest.raises(errors.StartFailed, match="runc exited 1"):
        await client.acquire_claim("acme/default/broken", "req-2", max_wait=2)


async def test_acquire_is_bounded_by_its_deadline(cluster: tuple[GrpcSchedulerClient, Claims, Claims]) -> None:
    client, _, _ = cluster
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await client.acquire_claim("acme/default/asleep", "req-3", max_wait=0.3)
    assert time.monotonic() - started < 1.5


async def test_no_leader_reachable_is_unavailable() -> None:
    follower = Claims(leader=False)
    server = await _server(follower)
    client = GrpcSchedulerClient([f"127.0.0.1:{server.port}", "127.0.0.1:1"], "gw-test", rpc_timeout=1)
    try:
        with pytest.raises(errors.Unavailable, match="no scheduler leader"):
            await client.release_claim("c-9")
    finally:
        await client.close()
        await server.stop(0)


async def test_acquire_waits_out_an_election_gap() -> None:
    # Both addresses are followers (the leader just died); one wins the election 0.6 s later.
    # The claim call keeps trying within its budget instead of failing with "no leader".
    a, b = Claims(leader=False), Claims(leader=False)
    servers = [await _server(a), await _server(b)]
    client = GrpcSchedulerClient([f"127.0.0.1:{s.port}" for s in servers], "gw-test", rpc_timeout=1)
    asyncio.get_running_loop().call_later(0.6, setattr, b, "leader", True)
    try:
        started = time.monotonic()
        claim = await client.acquire_claim("acme/default/chat", "req-4", max_wait=5)
        assert claim.claim_id == "c-1"
        assert 0.5 < time.monotonic() - started < 3
    finally:
        await client.close()
        for s in servers:
            await s.stop(0)


async def test_without_a_leader_calls_fail_within_leader_wait_then_at_once() -> None:
    # etcd lost quorum: no scheduler can hold a lease, for as long as that lasts. A claim waits
    # out leader_wait (an election would be over by then), not its whole queue budget; calls
    # after it fail at once, and the wait starts over once a leader answered again.
    a, b = Claims(leader=False), Claims(leader=False)
    servers = [await _server(a), await _server(b)]
    client = GrpcSchedulerClient([f"127.0.0.1:{s.port}" for s in servers], "gw-test", rpc_timeout=1,
                                 leader_wait=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="no scheduler leader"):
            await client.acquire_claim("acme/default/chat", "req-5", max_wait=30)
        assert 0.8 < time.monotonic() - started < 2.5
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="not the leader"):
            await client.acquire_claim("acme/default/chat", "req-6", max_wait=30)
        assert time.monotonic() - started < 0.5
        b.leader = True
        assert (await client.acquire_claim("acme/default/chat", "req-7", max_wait=30)).claim_id == "c-1"
        b.leader = False
        asyncio.get_running_loop().call_later(0.6, setattr, a, "leader", True)
        assert (await client.acquire_claim("acme/default/chat", "req-8", max_wait=30)).claim_id == "c-1"
    finally:
        await client.close()
        for s in servers:
            await s.stop(0)
