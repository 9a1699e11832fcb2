"""Quota checks and their write as one transaction: ``quota.write_checked``'s retry loop, and
SchedulerService's CreateFunction/UpdateFunction racing at a tenant's limit over ``FakeEtcd``
(whose every call yields to the event loop, so concurrent calls interleave between read and
write). The same race over a real etcd: tests/inproc/test_tenancy_inproc.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from services.scheduler import quota
from services.scheduler.api import SchedulerServicer
from services.scheduler.claimtable import ClaimTable
from services.scheduler.nodes_fake import FakeNodeClient
from services.scheduler.starter import Starter, StartResult
from services.scheduler.state import ClusterState, intent_of
from snapwake import errors, keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1 import scheduler_pb2 as pb
from snapwake.v1.scheduler_pb2 import TenantQuota
from snapwake.v1.types_pb2 import (
    Function,
    FunctionSpec,
    FunctionState,
    Gpu,
    Instance,
    InstanceState,
    Node,
    Policy,
    Resources,
)

GIB = 1 << 30


class Lead:
    def require(self) -> None:
        pass


class Context:
    """What ``_admin`` reads of a gRPC context, with auth off."""

    def invocation_metadata(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def servicer(etcd: FakeEtcd) -> SchedulerServicer:
    return SchedulerServicer(ClusterState(etcd), FakeNodeClient(etcd), Lead())  # type: ignore[arg-type]


def spec(name: str, gib: int = 0, min_instances: int = 0) -> FunctionSpec:
    return FunctionSpec(tenant="acme", namespace="prod", name=name, image="docker://registry.local/echo:1",
                        http_port=8080, resources=Resources(gpu_count=1 if gib else 0, gpu_memory_bytes=gib * GIB),
                        policy=Policy(min_instances=min_instances, max_instances=2))


async def outcomes(calls: list[Any]) -> tuple[int, list[errors.SnapwakeError]]:
    done = await asyncio.gather(*calls, return_exceptions=True)
    refused = [d for d in done if isinstance(d, BaseException)]
    assert all(isinstance(r, errors.SnapwakeError) for r in refused), refused
    return len(done) - len(refused), refused  # type: ignore[return-value]


async def test_write_checked_retries_a_lost_write_and_gives_up_bounded() -> None:
    tries: list[int] = []

    async def lands_third() -> tuple[str, bool]:
        tries.append(1)
        return "v", len(tries) == 3

    assert await quota.write_checked("f", lands_third) == "v" and len(tries) == 3

    async def never() -> tuple[str, bool]:
        tries.append(1)
        return "v", False

    tries.clear()
    with pytest.raises(errors.Aborted, match="f: changed concurrently 4 times"):
        await quota.write_checked("f", never, attempts=4)
    assert len(tries) == 4


async def test_write_checked_lets_a_refusal_through_at_once() -> None:
    tries: list[int] = []

    async def refused() -> tuple[str, bool]:
        tries.append(1)
        quota.check("functions", "acme", 1, 1, 1)
        return "v", True

    with pytest.raises(errors.ResourceExhausted, match="quota functions of tenant acme exceeded: limit 1"):
        await quota.write_checked("f", refused)
    assert tries == [1]


async def test_concurrent_creates_at_the_function_quota_pass_exactly_up_to_it() -> None:
    etcd = FakeEtcd()
    sv = servicer(etcd)
    await etcd.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_functions=3))
    ok, refused = await outcomes([sv.CreateFunction(pb.CreateFunctionRequest(spec=spec(f"f{n}")), Context())
                                  for n in range(8)])
    assert ok == 3 and len(refused) == 5
    assert all(isinstance(r, errors.ResourceExhausted) and "quota functions of tenant acme" in r.message
               for r in refused)
    assert len(await etcd.list(keys.FUNCTIONS + "acme/", Function)) == 3


@pytest.mark.parametrize("limit", [0, 100])
async def test_concurrent_creates_below_the_limit_all_land(limit: int) -> None:
    """Each lost transaction means another create landed, so 20 racing creates under a limit
    of 100 (or none) are retried until each lands, never refused or aborted."""
    etcd = FakeEtcd()
    sv = servicer(etcd)
    await etcd.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_functions=limit))
    ok, refused = await outcomes([sv.CreateFunction(pb.CreateFunctionRequest(spec=spec(f"f{n}")), Context())
                                  for n in range(20)])
    assert (ok, refused) == (20, [])
    assert len(await etcd.list(keys.FUNCTIONS + "acme/", Function)) == 20


async def test_concurrent_updates_cannot_commit_more_gpu_memory_than_the_quota() -> None:
    etcd = FakeEtcd()
    sv = servicer(etcd)
    for n in range(4):
        await sv.CreateFunction(pb.CreateFunctionRequest(spec=spec(f"g{n}", gib=10)), Context())
    await etcd.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_gpu_memory_bytes=25 * GIB))
    ok, refused = await outcomes([sv.UpdateFunction(pb.UpdateFunctionRequest(spec=spec(f"g{n}", gib=10,
                                                                                         min_instances=1)), Context())
                                  for n in range(4)])
    assert ok == 2 and len(refused) == 2
    assert all(isinstance(r, errors.ResourceExhausted) and "quota gpu_memory_bytes" in r.message for r in refused)
    stored = [e.value for e in await etcd.list(keys.FUNCTIONS + "acme/", Function)]
    assert sum(f.spec.policy.min_instances for f in stored) == 2  # type: ignore[attr-defined]
    assert sorted(f.revision for f in stored) == [1, 1, 2, 2]  # type: ignore[attr-defined]


async def test_an_unrelated_change_between_read_and_write_is_retried_not_refused() -> None:
    etcd = FakeEtcd()
    sv = servicer(etcd)
    await sv.CreateFunction(pb.CreateFunctionRequest(spec=spec("a")), Context())
    await etcd.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_functions=5))
    key = keys.function_key("acme/prod/a")

    landed: list[bool] = []
    real = etcd.put_if_unchanged

    async def recorded(*args: Any, **kwargs: Any) -> bool:
        landed.append(await real(*args, **kwargs))
        return landed[-1]

    etcd.put_if_unchanged = recorded  # type: ignore[method-assign]

    async def churn() -> None:  # the controller moving "a" through states meanwhile
        def mark(fn: Function) -> Function:
            fn.status_message += "."
            return fn

        for _ in range(3):
            await etcd.update(key, Function, mark)

    made, _ = await asyncio.gather(sv.CreateFunction(pb.CreateFunctionRequest(spec=spec("b")), Context()), churn())
    assert made.function.id == "acme/prod/b"
    assert landed[0] is False and landed[-1] is True  # lost to the churn, then read, checked and wrote again
    assert (await etcd.get(keys.function_key("acme/prod/b"), Function)) is not None


async def test_create_of_an_existing_function_and_update_of_a_missing_one_are_named() -> None:
    etcd = FakeEtcd()
    sv = servicer(etcd)
    made = await sv.CreateFunction(pb.CreateFunctionRequest(spec=spec("a")), Context())
    assert made.function.state in (FunctionState.FUNCTION_STATE_READY, FunctionState.FUNCTION_STATE_PENDING)
    with pytest.raises(errors.AlreadyExists, match="function acme/prod/a already exists"):
        await sv.CreateFunction(pb.CreateFunctionRequest(spec=spec("a")), Context())
    with pytest.raises(errors.NotFound, match="function acme/prod/zz does not exist"):
        await sv.UpdateFunction(pb.UpdateFunctionRequest(spec=spec("zz")), Context())
    got = await sv.UpdateFunction(pb.UpdateFunctionRequest(spec=spec("a", gib=1)), Context())
    assert got.function.revision == 2 and got.function.create_time == made.function.create_time


# The starter's GPU memory quota: a start that waits on an eviction is checked again ----------

def _gpu_fn(name: str, gib: int, tenant: str = "acme") -> Function:
    policy = Policy(concurrency=1, max_instances=4, idle_timeout=Duration(seconds=60),
                    queue_timeout=Duration(seconds=2), start_timeout=Duration(seconds=10))
    return Function(id=f"{tenant}/d/{name}", revision=1, state=FunctionState.FUNCTION_STATE_READY,
                    spec=FunctionSpec(tenant=tenant, namespace="d", name=name, policy=policy,
                                      resources=Resources(gpu_count=1, gpu_memory_bytes=gib * GIB)))


async def _mirrored(state: ClusterState, etcd: FakeEtcd, key: str, value: Any) -> None:
    await etcd.put(key, value)
    for _ in range(100):
        if any(key in m.items for m in state.mirrors.values()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the mirror never showed {key}")


async def test_a_start_that_evicted_first_counts_a_start_made_meanwhile() -> None:
    """acme may hold 50 GiB. ``big`` (45) must evict globex's idle instance first and waits on
    it; meanwhile ``small`` (10) fits at once and starts. Checked only before the eviction,
    ``big`` would start too (55 GiB); checked again as it is given its slice, it is refused."""
    etcd = FakeEtcd()
    state, nodes, table = ClusterState(etcd), FakeNodeClient(etcd), ClaimTable(time.monotonic, 30.0)
    starter = Starter(state, nodes, table, 30.0, quota.Quotas(quota.Limits(gpu_memory_bytes=50 * GIB), state.quota))
    await state.start()
    try:
        node = Node(name="node-a", address="node-a:7070", gpus=[Gpu(index=0, memory_total_bytes=80 * GIB)])
        node.heartbeat_time.FromNanoseconds(time.time_ns())
        await _mirrored(state, etcd, keys.node_key("node-a"), node)
        big, small, other = _gpu_fn("big", 45), _gpu_fn("small", 10), _gpu_fn("x", 40, tenant="globex")
        for fn in (big, small, other):
            await _mirrored(state, etcd, keys.function_key(fn.id), fn)
        idle = Instance(id="i-idle", function_id=other.id, revision=1, node="node-a", gpu_index=0,
                        gpu_memory_bytes=40 * GIB, state=InstanceState.INSTANCE_STATE_IDLE, endpoint="127.0.0.1:9")
        await etcd.put(keys.intent_key(idle.id), intent_of(idle))  # the scheduler asked for it
        await _mirrored(state, etcd, keys.instance_key("node-a", idle.id), idle)
        got = await asyncio.gather(starter.start(big), starter.start(small), return_exceptions=True)
        assert isinstance(got[1], StartResult), got
        assert isinstance(got[0], errors.ResourceExhausted) and "quota gpu_memory_bytes of tenant acme" in \
            got[0].message, got
        assert ("stop", "i-idle") in [(c.op, c.instance_id) for c in nodes.calls]  # it did wait on the eviction
        held = sum(quota.gpu_bytes(i) for i in starter.view().instances if quota.tenant_of(i.function_id) == "acme")
        assert held == 10 * GIB
    finally:
        await state.stop()
