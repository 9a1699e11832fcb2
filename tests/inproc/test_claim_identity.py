"""A gateway's claims are tied to its certificate: the real scheduler over mutual TLS and real
etcd refuses a ``gateway_id`` that is not the caller certificate's (PERMISSION_DENIED naming the
field), so gateway A's certificate can neither claim, release nor report as gateway B. The
gateway's own config derives its id from its certificate and refuses one that does not fit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.gateway.config import GatewayConfig
from services.scheduler.app import Scheduler
from services.scheduler.config import SchedulerConfig
from services.scheduler.state import intent_of
from snapwake import keys
from snapwake.etcd import Etcd
from snapwake.grpcclient import channel
from snapwake.pki import Identity, create_ca, issue_dir
from snapwake.testing import EtcdProcess
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc
from snapwake.v1.types_pb2 import FunctionSpec, Instance, InstanceState, Policy, SnapshotMode

pytestmark = [pytest.mark.timeout(60)]
aio = pytest.mark.asyncio(loop_scope="module")
T = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("claim-pki")
    ca = create_ca(base)
    for identity in (Identity("scheduler", "scheduler"), Identity("gateway", "gw-a"), Identity("gateway", "gw-b")):
        issue_dir(ca, base / f"{identity.role}-{identity.name}", identity, ["127.0.0.1"])
    return base


def tls(pki: Path, folder: str | None = None) -> ClientTls:
    ca = (pki / "ca.crt").read_bytes()
    if folder is None:
        return ClientTls(ca)
    return ClientTls(ca, (pki / folder / "tls.crt").read_bytes(), (pki / folder / "tls.key").read_bytes())


@pytest_asyncio.fixture(loop_scope="module")
async def scheduler(etcd_server: EtcdProcess, pki: Path) -> AsyncIterator[tuple[Scheduler, str]]:
    """A leading scheduler with a certificate, one function and a RUNNING instance of it (so a
    claim is granted at once, with no node to call); yields it and the function id."""
    cfg = SchedulerConfig(listen="127.0.0.1:0", admin_listen="127.0.0.1:0", etcd=etcd_server.address,
                          tls_dir=str(pki / "scheduler-scheduler"), election_ttl_s=2, reconcile_interval_s=0.1,
                          claim_adopt_grace_s=0.1, claim_ttl_s=60.0)
    async with Etcd.connect(etcd_server.address) as store:
        await store.delete_prefix(keys.PREFIX)
        sched = Scheduler(cfg, store)
        await sched.start()
        try:
            deadline = time.monotonic() + 10
            while not (sched.election.is_leader and not sched.broker.settling_s()):
                assert time.monotonic() < deadline, "no leadership"
                await asyncio.sleep(0.05)
            spec = FunctionSpec(name="owned", model_dir="/models/echo",
                                policy=Policy(snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE, concurrency=4,
                                              max_instances=1))
            async with channel(f"127.0.0.1:{sched.admin_port}", tls(pki), server_role="scheduler") as ch:
                fn = (await scheduler_pb2_grpc.SchedulerServiceStub(ch).CreateFunction(
                    scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=T)).function
            inst = Instance(id="i-0000000000aa", function_id=fn.id, revision=fn.revision, node="node-a",
                            state=InstanceState.INSTANCE_STATE_RUNNING, endpoint="127.0.0.1:9")
            await store.put(keys.intent_key(inst.id), intent_of(inst))  # as if the scheduler had started it
            await store.put(keys.instance_key("node-a", inst.id), inst)
            deadline = time.monotonic() + 10
            while sched.state.instance("i-0000000000aa") is None:
                assert time.monotonic() < deadline, "the instance never reached the scheduler's mirror"
                await asyncio.sleep(0.05)
            yield sched, fn.id
        finally:
            await sched.stop(0)
            await store.delete_prefix(keys.PREFIX)


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@aio
async def test_a_gateway_certificate_cannot_claim_release_or_report_as_another_gateway(
        scheduler: tuple[Scheduler, str], pki: Path) -> None:
    sched, fid = scheduler
    address = f"127.0.0.1:{sched.port}"
    async with channel(address, tls(pki, "gateway-gw-a"), server_role="scheduler") as cha, \
            channel(address, tls(pki, "gateway-gw-b"), server_role="scheduler") as chb:
        a, b = scheduler_pb2_grpc.ClaimServiceStub(cha), scheduler_pb2_grpc.ClaimServiceStub(chb)
        # A under its own ids: its certificate's name, and the name with a replica suffix.
        held = await a.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-a:r1"), timeout=T)
        bare = await a.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-a"), timeout=T)
        assert sched.table.in_use(held.instance_id) == 2
        # B's certificate speaking as A: every call refused, naming the field, nothing changed.
        for gateway_id in ("gw-a:r1", "gw-a", "gw-a:", "gw-ab", "gw"):
            code, details = await _code(b.AcquireClaim(scheduler_pb2.AcquireClaimRequest(
                function_id=fid, gateway_id=gateway_id), timeout=T))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "gateway_id" in details, (gateway_id, code, details)
            assert "gateway/gw-b" in details, details
        code, details = await _code(b.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(
            claim_id=held.claim_id, gateway_id="gw-a:r1"), timeout=T))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "gateway_id" in details, details
        # An empty report as A would drop A's claims (it "holds none"): refused too.
        code, details = await _code(b.ReportQueue(scheduler_pb2.ReportQueueRequest(gateway_id="gw-a:r1"), timeout=T))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "gateway_id" in details, details
        assert sched.table.in_use(held.instance_id) == 2
        # B under its own id still cannot touch A's claim (the claim is A's certificate's).
        code, details = await _code(b.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(
            claim_id=held.claim_id, gateway_id="gw-b"), timeout=T))
        assert code == grpc.StatusCode.PERMISSION_DENIED and held.claim_id in details, details
        mine = await b.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=fid, gateway_id="gw-b:x"), timeout=T)
        await b.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=mine.claim_id, gateway_id="gw-b:x"), timeout=T)
        # A releases its own; an empty id is still INVALID_ARGUMENT, before the identity check.
        await a.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=held.claim_id, gateway_id="gw-a:r1"), timeout=T)
        await a.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=bare.claim_id, gateway_id="gw-a"), timeout=T)
        assert sched.table.in_use(held.instance_id) == 0
        code, details = await _code(a.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id="c-1"), timeout=T))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "gateway_id" in details


def test_the_gateway_takes_its_id_from_its_certificate(pki: Path) -> None:
    base = GatewayConfig(tls_dir=str(pki / "gateway-gw-a"))
    assert base.validate() == []
    assert base.with_gateway_id().gateway_id.startswith("gw-a:")
    assert base.with_gateway_id().gateway_id != base.with_gateway_id().gateway_id  # one per replica
    assert GatewayConfig(tls_dir=str(pki / "gateway-gw-a"), gateway_id="gw-a:pod-1").validate() == []
    problems = GatewayConfig(tls_dir=str(pki / "gateway-gw-a"), gateway_id="gw-b").validate()
    assert len(problems) == 1 and problems[0].startswith("gateway_id:") and "gw-a" in problems[0], problems
    assert GatewayConfig(dev_plaintext=True).with_gateway_id().gateway_id.startswith("gw-")
