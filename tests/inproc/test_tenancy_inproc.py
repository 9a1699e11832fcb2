"""Admin tokens, tenant scoping, quotas, the audit log and API keys, against the real scheduler
gRPC server over real etcd (and the real gateway app for the API keys).

The refusal tables are built from the SchedulerService descriptor, so an RPC added later
without a row here fails ``test_every_rpc_has_a_row``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf.message import Message

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.scheduler_client import GrpcSchedulerClient
from services.scheduler.app import Scheduler
from services.scheduler.bootstrap import ensure_operator_token, ensure_secret
from services.scheduler.config import SchedulerConfig
from services.scheduler.state import intent_of
from snapwake import cli, keys
from snapwake.etcd import Etcd
from snapwake.grpcclient import channel
from snapwake.testing import EtcdProcess
from snapwake.v1 import scheduler_pb2 as pb
from snapwake.v1 import scheduler_pb2_grpc
from snapwake.v1.types_pb2 import (
    FunctionSpec,
    Instance,
    InstanceState,
    Policy,
    Resources,
    Snapshot,
    SnapshotMode,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]
GIB = 1 << 30
SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]


@dataclasses.dataclass
class Env:
    sched: Scheduler
    stub: scheduler_pb2_grpc.SchedulerServiceStub
    operator: str
    acme: str
    globex: str
    acme_id: str
    audit: Path
    secret_file: Path

    async def call(self, token: str | None, method: str, request: Message) -> Any:
        md = (("authorization", f"Bearer {token}"),) if token else None
        return await getattr(self.stub, method)(request, metadata=md, timeout=10)

    async def refused(self, token: str | None, method: str, request: Message) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.call(token, method, request)
        return info.value.code(), info.value.details() or ""


def spec(tenant: str, name: str, *, gib: int = 0, min_instances: int = 0, standby_per_node: int = 0) -> FunctionSpec:
    return FunctionSpec(tenant=tenant, namespace="prod", name=name, image="docker://registry.local/echo:1", http_port=8080,
                        resources=Resources(gpu_count=1 if gib else 0, gpu_memory_bytes=gib * GIB),
                        policy=Policy(min_instances=min_instances, max_instances=2, standby_per_node=standby_per_node,
                                      snapshot_mode=SnapshotMode.SNAPSHOT_MODE_PROCESS if standby_per_node
                                      else SnapshotMode.SNAPSHOT_MODE_NONE))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("tenancy")
    secret = tmp / "apikey.secret"
    ensure_secret(secret)
    cfg = SchedulerConfig(listen="127.0.0.1:0", etcd=etcd_server.address, election_ttl_s=2, reconcile_interval_s=0.1,
                          claim_adopt_grace_s=0.1, admin_auth=True, audit_log=str(tmp / "audit.log"),
                          api_key_secret_file=str(secret))
    async with Etcd.connect(etcd_server.address) as store:
        await store.delete_prefix(keys.PREFIX)
        sched = Scheduler(cfg, store)
        await sched.start()
        try:
            for _ in range(100):
                if sched.election.is_leader and not sched.broker.settling_s():
                    break
                await asyncio.sleep(0.1)
            await ensure_operator_token(store, tmp / "operator.token", "test")
            operator = (tmp / "operator.token").read_text().strip()
            async with channel(f"127.0.0.1:{sched.port}") as ch:
                e = Env(sched, scheduler_pb2_grpc.SchedulerServiceStub(ch), operator, "", "", "", tmp / "audit.log",
                        secret)
                for tenant in ("acme", "globex"):
                    made = await e.call(operator, "CreateAdminToken", pb.CreateAdminTokenRequest(tenant=tenant))
                    setattr(e, tenant, made.secret)
                    if tenant == "acme":
                        e.acme_id = made.token.id
                    await e.call(operator, "CreateFunction", pb.CreateFunctionRequest(spec=spec(tenant, "chat")))
                    fid = f"{tenant}/prod/chat"
                    inst = Instance(id=f"i-{tenant}", function_id=fid, revision=1, node="node-a",
                                    state=InstanceState.INSTANCE_STATE_STANDBY)
                    await store.put(keys.intent_key(inst.id), intent_of(inst))  # as if the scheduler had started it
                    await store.put(keys.instance_key("node-a", inst.id), inst)
                    await store.put(keys.snapshot_key(fid, 1), Snapshot(id=keys.snapshot_id(fid, 1), function_id=fid,
                                                                        revision=1, total_bytes=GIB))
                yield e
        finally:
            await sched.stop(0)
            await store.delete_prefix(keys.PREFIX)


# One request per SchedulerService RPC, each naming globex's resources (or needing an operator).
GLOBEX_ROWS: dict[str, Callable[[], Message]] = {
    "CreateFunction": lambda: pb.CreateFunctionRequest(spec=spec("globex", "new")),
    "GetFunction": lambda: pb.GetFunctionRequest(function_id="globex/prod/chat"),
    "ListFunctions": lambda: pb.ListFunctionsRequest(tenant="globex"),
    "UpdateFunction": lambda: pb.UpdateFunctionRequest(spec=spec("globex", "chat")),
    "DeleteFunction": lambda: pb.DeleteFunctionRequest(function_id="globex/prod/chat"),
    "ListNodes": lambda: pb.ListNodesRequest(),
    "ListInstances": lambda: pb.ListInstancesRequest(function_id="globex/prod/chat"),
    "GetInstanceLogs": lambda: pb.GetInstanceLogsRequest(instance_id="i-globex"),
    "ListSnapshots": lambda: pb.ListSnapshotsRequest(function_id="globex/prod/chat"),
    "CordonNode": lambda: pb.CordonNodeRequest(node="node-a"),
    "UncordonNode": lambda: pb.UncordonNodeRequest(node="node-a"),
    "CreateAdminToken": lambda: pb.CreateAdminTokenRequest(tenant="acme"),
    "ListAdminTokens": lambda: pb.ListAdminTokensRequest(),
    "RevokeAdminToken": lambda: pb.RevokeAdminTokenRequest(id="0123456789ab"),
    "CreateApiKey": lambda: pb.CreateApiKeyRequest(tenant="acme"),
    "ListApiKeys": lambda: pb.ListApiKeysRequest(),
    "RevokeApiKey": lambda: pb.RevokeApiKeyRequest(id="0123456789ab"),
    "GetTenantQuota": lambda: pb.GetTenantQuotaRequest(tenant="globex"),
    "SetTenantQuota": lambda: pb.SetTenantQuotaRequest(quota=pb.TenantQuota(tenant="acme", max_functions=100)),
}


async def test_every_rpc_has_a_row() -> None:
    assert set(GLOBEX_ROWS) == {m.name for m in SERVICE.methods}


@pytest.mark.parametrize("method", sorted(GLOBEX_ROWS))
async def test_another_tenants_token_is_refused(env: Env, method: str) -> None:
    code, details = await env.refused(env.acme, method, GLOBEX_ROWS[method]())
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert env.acme_id in details and env.acme not in details  # names the token by id only


@pytest.mark.parametrize("token", ["", "Bearer-less", "swt-0123456789ab-" + "a" * 43])
async def test_no_or_unknown_token_is_unauthenticated_on_every_rpc(env: Env, token: str) -> None:
    for method in GLOBEX_ROWS:
        code, _ = await env.refused(token or None, method, GLOBEX_ROWS[method]())
        assert code == grpc.StatusCode.UNAUTHENTICATED, method


async def test_existence_does_not_leak(env: Env) -> None:
    real = await env.refused(env.acme, "GetFunction", pb.GetFunctionRequest(function_id="globex/prod/chat"))
    ghost = await env.refused(env.acme, "GetFunction", pb.GetFunctionRequest(function_id="globex/prod/ghost"))
    assert real == ghost  # the answer depends on the id's tenant alone
    inst = await env.refused(env.acme, "GetInstanceLogs", pb.GetInstanceLogsRequest(instance_id="i-globex"))
    none = await env.refused(env.acme, "GetInstanceLogs", pb.GetInstanceLogsRequest(instance_id="i-ghostly"))
    assert inst[0] == none[0] == grpc.StatusCode.PERMISSION_DENIED
    assert inst[1].replace("i-globex", "X") == none[1].replace("i-ghostly", "X")


async def test_lists_are_filtered_to_the_callers_tenant(env: Env) -> None:
    fns = await env.call(env.acme, "ListFunctions", pb.ListFunctionsRequest())
    insts = await env.call(env.acme, "ListInstances", pb.ListInstancesRequest())
    snaps = await env.call(env.acme, "ListSnapshots", pb.ListSnapshotsRequest())
    assert [f.id for f in fns.functions] == ["acme/prod/chat"]
    assert [i.id for i in insts.instances] == ["i-acme"]
    assert [s.function_id for s in snaps.snapshots] == ["acme/prod/chat"]
    every = await env.call(env.operator, "ListFunctions", pb.ListFunctionsRequest())
    assert {f.id for f in every.functions} >= {"acme/prod/chat", "globex/prod/chat"}
    got = await env.call(env.acme, "GetFunction", pb.GetFunctionRequest(function_id="acme/prod/chat"))
    assert got.function.id == "acme/prod/chat"
    mine = await env.call(env.acme, "GetTenantQuota", pb.GetTenantQuotaRequest())
    assert mine.quota.tenant == "acme" and mine.usage.functions == 1 and mine.usage.standbys == 1


async def test_a_revoked_token_is_refused_at_once(env: Env) -> None:
    made = await env.call(env.operator, "CreateAdminToken", pb.CreateAdminTokenRequest(tenant="acme"))
    assert (await env.call(made.secret, "ListFunctions", pb.ListFunctionsRequest())).functions
    listed = await env.call(env.operator, "ListAdminTokens", pb.ListAdminTokensRequest())
    assert made.token.id in {t.id for t in listed.tokens} and not any(t.sha256 for t in listed.tokens)
    await env.call(env.operator, "RevokeAdminToken", pb.RevokeAdminTokenRequest(id=made.token.id))
    code, details = await env.refused(made.secret, "ListFunctions", pb.ListFunctionsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown or revoked" in details


async def test_quotas_refuse_with_the_quota_the_limit_and_the_use(env: Env) -> None:
    await env.call(env.operator, "SetTenantQuota", pb.SetTenantQuotaRequest(quota=pb.TenantQuota(
        tenant="acme", max_functions=1, max_gpu_memory_bytes=30 * GIB, max_standbys=2)))
    code, details = await env.refused(env.acme, "CreateFunction", pb.CreateFunctionRequest(spec=spec("acme", "two")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "quota functions of tenant acme exceeded: limit 1, in use 1, this needs 1 more"
    code, details = await env.refused(env.acme, "UpdateFunction", pb.UpdateFunctionRequest(
        spec=spec("acme", "chat", gib=40)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota gpu_memory_bytes of tenant acme" in details
    assert f"limit {30 * GIB} bytes" in details
    code, details = await env.refused(env.acme, "UpdateFunction", pb.UpdateFunctionRequest(
        spec=spec("acme", "chat", standby_per_node=3)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota standbys of tenant acme" in details
    # Another tenant's limits are its own; the operator lifts acme's.
    await env.call(env.globex, "CreateFunction", pb.CreateFunctionRequest(spec=spec("globex", "two")))
    await env.call(env.operator, "SetTenantQuota", pb.SetTenantQuotaRequest(quota=pb.TenantQuota(tenant="acme")))
    await env.call(env.acme, "UpdateFunction", pb.UpdateFunctionRequest(spec=spec("acme", "chat", gib=40)))


async def test_concurrent_creates_at_a_quota_pass_exactly_up_to_it(env: Env) -> None:
    """N CreateFunction calls at once against a quota of K free slots: exactly K land (the
    check and the write are one etcd transaction), the others are refused naming the quota."""
    tenant, n, k = "initech", 12, 4
    await env.call(env.operator, "SetTenantQuota", pb.SetTenantQuotaRequest(quota=pb.TenantQuota(
        tenant=tenant, max_functions=k)))
    done = await asyncio.gather(*(env.call(env.operator, "CreateFunction", pb.CreateFunctionRequest(
        spec=spec(tenant, f"race{i}"))) for i in range(n)), return_exceptions=True)
    refused = [d for d in done if isinstance(d, BaseException)]
    assert len(done) - len(refused) == k
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
               and f"quota functions of tenant {tenant} exceeded: limit {k}, in use {k}" in (r.details() or "")
               for r in refused), refused
    listed = await env.call(env.operator, "ListFunctions", pb.ListFunctionsRequest(tenant=tenant))
    assert len(listed.functions) == k
    for fn in listed.functions:
        await env.call(env.operator, "DeleteFunction", pb.DeleteFunctionRequest(function_id=fn.id))


async def test_changes_and_refusals_are_audited_without_secrets(env: Env) -> None:
    await env.refused(env.acme, "DeleteFunction", pb.DeleteFunctionRequest(function_id="globex/prod/chat"))
    await env.refused(None, "ListNodes", pb.ListNodesRequest())
    await env.refused(env.operator, "CordonNode", pb.CordonNodeRequest(node="node-b"))  # unknown: a failed change
    await env.call(env.acme, "ListFunctions", pb.ListFunctionsRequest())  # a read that succeeds: not audited
    text = env.audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    for secret in (env.operator, env.acme, env.globex):
        assert secret.rsplit("-", 1)[1] not in text
    assert any({"method": "DeleteFunction", "resource": "globex/prod/chat", "outcome": "PERMISSION_DENIED",
                "token_id": env.acme_id, "tenant": "acme", "operator": False}.items() <= li.items() for li in lines)
    assert any(li["method"] == "ListNodes" and li["outcome"] == "UNAUTHENTICATED" and li["token_id"] is None
               for li in lines)
    assert any(li["method"] == "CordonNode" and li["outcome"] == "NOT_FOUND" and li["operator"] for li in lines)
    assert any(li["method"] == "CreateAdminToken" and li["outcome"] == "OK" and li["resource"] == "acme"
               for li in lines)
    assert any(li["method"] == "SetTenantQuota" and li["outcome"] == "OK" for li in lines)
    assert not any(li["method"] == "ListFunctions" and li["outcome"] == "OK" for li in lines)
    assert all(li["time"].endswith("Z") and li["peer"] for li in lines)


@contextlib.asynccontextmanager
async def gateway(env: Env, refresh_s: float) -> AsyncIterator[httpx.AsyncClient]:
    client = GrpcSchedulerClient([f"127.0.0.1:{env.sched.port}"], "gw-tenancy", admin_token=env.operator)
    config = GatewayConfig(api_key_secret_file=str(env.secret_file), api_key_refresh=refresh_s, rate_limit_rps=0.0)
    app = build_app(client, config)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10) as http:
            yield http
    finally:
        await client.close()


async def _until_status(http: httpx.AsyncClient, key: str, status: int, limit_s: float) -> float:
    began = time.monotonic()
    while True:
        got = (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code
        if got == status:
            return time.monotonic() - began
        assert time.monotonic() - began < limit_s, f"still {got}, not {status}, after {limit_s}s"
        await asyncio.sleep(0.05)


async def test_an_api_key_works_and_stops_working_within_the_refresh_bound(env: Env) -> None:
    refresh_s = 0.5
    bound_s = refresh_s + 1.0  # one refresh interval plus one SyncApiKeys call, with room for a slow machine
    async with gateway(env, refresh_s) as http:
        made = await env.call(env.operator, "CreateApiKey", pb.CreateApiKeyRequest(tenant="acme", description="t"))
        assert made.secret.startswith("sk-sw-" + made.key.id + "-") and not made.key.hmac_sha256
        stored = (await env.sched.etcd.get(keys.api_key_key(made.key.id), pb.ApiKey)).value  # type: ignore[union-attr]
        assert stored.hmac_sha256 and made.secret.rsplit("-", 1)[1] not in str(stored)
        await _until_status(http, made.secret, 200, bound_s)
        models = (await http.get("/v1/models", headers={"Authorization": f"Bearer {made.secret}"})).json()
        assert models["data"] and {m["owned_by"] for m in models["data"]} == {"acme"}
        board = await http.get("/dashboard/api/state", headers={"Authorization": f"Bearer {made.secret}"})
        assert board.status_code == 200 and "acme/prod/chat" in board.text and "globex" not in board.text
        listed = await env.call(env.operator, "ListApiKeys", pb.ListApiKeysRequest(id_prefix=made.key.id[:4]))
        assert [k.id for k in listed.keys] == [made.key.id] and not listed.keys[0].hmac_sha256
        forged = made.secret[:-2] + ("AA" if not made.secret.endswith("AA") else "BB")
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})).status_code == 401
        await env.call(env.operator, "RevokeApiKey", pb.RevokeApiKeyRequest(id=made.key.id))
        took = await _until_status(http, made.secret, 401, bound_s)
        assert took <= bound_s


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_the_cli_manages_keys_tokens_and_quotas(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    (tmp_path / "op").write_text(env.operator + "\n")
    (tmp_path / "acme").write_text(env.acme)
    op = ["--scheduler", f"127.0.0.1:{env.sched.port}", "--plaintext", "--token-file", str(tmp_path / "op")]
    assert await _cli(*op, "apikey", "create", "acme", "--description", "from the cli") == 0
    out = capsys.readouterr().out
    kid = re.search(r"^id: ([0-9a-f]{12})$", out, re.M)
    secret = re.search(r"(sk-sw-\S+)", out)
    assert kid and secret and secret.group(1).startswith(f"sk-sw-{kid.group(1)}-")
    assert await _cli(*op, "apikey", "list", "--prefix", kid.group(1)) == 0
    listed = capsys.readouterr().out
    assert kid.group(1) in listed and "from the cli" in listed and secret.group(1) not in listed
    assert await _cli(*op, "apikey", "revoke", kid.group(1)) == 0
    assert await _cli(*op, "apikey", "revoke", kid.group(1)) == 3  # not found
    assert await _cli(*op, "quota", "set", "globex", "--functions", "5", "--gpu-memory", "10GiB") == 0
    capsys.readouterr()
    assert await _cli(*op, "quota", "get", "globex") == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["functions"] == ["5", str(len((await env.call(env.operator, "ListFunctions", pb.ListFunctionsRequest(
        tenant="globex"))).functions))] and rows["gpu_memory_bytes"][0] == str(10 * GIB)
    acme = ["--scheduler", f"127.0.0.1:{env.sched.port}", "--plaintext", "--token-file", str(tmp_path / "acme")]
    assert await _cli(*acme, "token", "list") == 7  # operator only
    assert await _cli("--scheduler", f"127.0.0.1:{env.sched.port}", "--plaintext", "list") == 7  # no token
    assert "Unauthenticated: no credentials" in capsys.readouterr().err


async def test_bootstrap_keeps_a_known_token_and_writes_it_privately(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "access" / "op.token"
    first, created = await ensure_operator_token(env.sched.etcd, path, "t")  # type: ignore[arg-type]
    assert created and path.stat().st_mode & 0o777 == 0o600
    again, created = await ensure_operator_token(env.sched.etcd, path, "t", path.read_text().strip())  # type: ignore[arg-type]
    assert (again, created) == (first, False)
    await env.call(env.operator, "RevokeAdminToken", pb.RevokeAdminTokenRequest(id=first))
    fresh, created = await ensure_operator_token(env.sched.etcd, path, "t", path.read_text().strip())  # type: ignore[arg-type]
    assert created and fresh != first
    assert (await env.call(path.read_text().strip(), "ListNodes", pb.ListNodesRequest())) is not None


@pytest.mark.parametrize(("method", "request_"), [
    ("RevokeApiKey", pb.RevokeApiKeyRequest(id="../tokens/0123")),
    ("RevokeAdminToken", pb.RevokeAdminTokenRequest(id="")),
    ("ListApiKeys", pb.ListApiKeysRequest(id_prefix="x/")),
    ("CreateAdminToken", pb.CreateAdminTokenRequest(tenant="acme", operator=True)),
    ("CreateApiKey", pb.CreateApiKeyRequest(tenant="Acme Corp")),
    ("CreateApiKey", pb.CreateApiKeyRequest(tenant="acme", description="x\n" * 10)),
])
async def test_bad_admin_input_is_refused_by_name(env: Env, method: str, request_: Message) -> None:
    code, details = await env.refused(env.operator, method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.split(":")[0] in ("id", "id_prefix", "give either tenant or operator, not both or neither",
                                     "tenant 'Acme Corp' must be 1-63 chars of [a-z0-9-], starting and ending "
                                     "alphanumeric", "description"), details
