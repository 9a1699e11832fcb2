"""Tenancy's pure parts: credentials, bearer parsing, caller scoping, quotas (and where the
starter and controller apply them, over the fakes), the audit log, the gateway's key table."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from services.gateway.keys import ApiKeyTable, KeyStore, Principal, hash_entry
from services.scheduler import quota
from services.scheduler.access import OPEN, Caller, bearer
from services.scheduler.audit import AuditLog
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.claimtable import ClaimTable
from services.scheduler.controller import Controller
from services.scheduler.nodes_fake import FakeNodeClient
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.starter import Starter
from services.scheduler.state import ClusterState
from snapwake import credentials, errors, keys
from snapwake.etcd_fake import FakeEtcd
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
    Snapshot,
    SnapshotMode,
    SnapshotState,
)

GIB = 1 << 30


# Credentials -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [credentials.TOKEN_PREFIX, credentials.API_KEY_PREFIX])
def test_a_new_credential_parses_back_to_its_id(prefix: str) -> None:
    cred = credentials.new_credential(prefix)
    assert credentials.parse(cred.text, prefix) == cred
    assert len(cred.id) == 12 and cred.text.startswith(prefix + cred.id + "-")
    assert credentials.new_credential(prefix).text != cred.text


@pytest.mark.parametrize("text", [
    "", "swt-", "swt-0123456789ab", "swt-0123456789ab-short", "swt-0123456789AB-" + "a" * 43,
    "sk-sw-0123456789ab-" + "a" * 43, "swt-0123456789ab-" + "a" * 42 + "!", "swt-../../etc-" + "a" * 43,
    "swt-0123456789ab-" + "a" * 44,
])
def test_anything_but_a_well_formed_token_is_no_token(text: str) -> None:
    assert credentials.parse(text, credentials.TOKEN_PREFIX) is None


def test_the_keyed_digest_depends_on_the_secret_and_matches_in_constant_time() -> None:
    key = credentials.new_credential(credentials.API_KEY_PREFIX).text
    a, b = credentials.hmac_digest(b"s" * 32, key), credentials.hmac_digest(b"t" * 32, key)
    assert a != b and credentials.matches(a, credentials.hmac_digest(b"s" * 32, key)) and not credentials.matches(a, b)


def test_a_short_secret_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("too short\n")
    with pytest.raises(ValueError, match="api_key_secret_file: .* holds 9 bytes; at least 32"):
        credentials.load_secret(tmp_path / "s")
    with pytest.raises(ValueError, match="api_key_secret_file: cannot read"):
        credentials.load_secret(tmp_path / "missing")


# Bearer metadata and scoping ---------------------------------------------------------------

@pytest.mark.parametrize(("metadata", "message"), [
    ((), "no credentials"),
    ((("authorization", "Basic abc"),), "expected 'Bearer"),
    ((("authorization", "Bearer "),), "expected 'Bearer"),
    ((("authorization", "Bearer a"), ("authorization", "Bearer b")), "not several"),
])
def test_bad_authorization_metadata_is_unauthenticated(metadata: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(errors.Unauthenticated, match=message):
        bearer(metadata)


def test_bearer_reads_the_token() -> None:
    assert bearer((("user-agent", "x"), ("authorization", "Bearer  swt-abc "))) == "swt-abc"


def test_a_tenant_caller_reaches_only_its_tenant() -> None:
    acme = Caller("0123456789ab", "acme", operator=False)
    acme.require_function("acme/prod/chat", "function_id")
    with pytest.raises(errors.PermissionDenied, match="may only reach tenant acme's"):
        acme.require_function("globex/prod/chat", "function_id")
    with pytest.raises(errors.PermissionDenied, match="needs an operator token"):
        acme.require_operator("ListNodes")
    OPEN.require_function("globex/prod/chat", "function_id")
    OPEN.require_operator("ListNodes")
    assert acme.who() == {"token_id": "0123456789ab", "tenant": "acme", "operator": False}


# Quotas ------------------------------------------------------------------------------------

def _fn(name: str, tenant: str = "acme", *, gib: int = 20, min_instances: int = 0, standby_per_node: int = 0,
        mode: int = SnapshotMode.SNAPSHOT_MODE_NONE) -> Function:
    policy = Policy(concurrency=1, min_instances=min_instances, max_instances=4, standby_per_node=standby_per_node,
                    snapshot_mode=mode, idle_timeout=Duration(seconds=60), queue_timeout=Duration(seconds=2),  # type: ignore[arg-type]
                    start_timeout=Duration(seconds=10))
    spec = FunctionSpec(tenant=tenant, namespace="d", name=name, policy=policy,
                        resources=Resources(gpu_count=1, gpu_memory_bytes=gib * GIB))
    return Function(id=f"{tenant}/d/{name}", revision=1, spec=spec, state=FunctionState.FUNCTION_STATE_READY)


def _inst(iid: str, fn: Function, state: int, node: str = "node-a") -> Instance:
    return Instance(id=iid, function_id=fn.id, revision=fn.revision, node=node, gpu_index=0,
                    gpu_memory_bytes=fn.spec.resources.gpu_memory_bytes, state=state,  # type: ignore[arg-type]
                    endpoint="127.0.0.1:9" if state in (InstanceState.INSTANCE_STATE_RUNNING,
                                                          InstanceState.INSTANCE_STATE_IDLE) else "")


def test_overrides_replace_only_the_fields_they_set() -> None:
    defaults = quota.Limits(functions=10, standbys=4, snapshot_bytes=100, gpu_memory_bytes=80)
    assert quota.limits_for(defaults, None) == defaults
    got = quota.limits_for(defaults, TenantQuota(tenant="acme", max_functions=2, max_gpu_memory_bytes=0))
    assert got == quota.Limits(functions=2, standbys=4, snapshot_bytes=100, gpu_memory_bytes=0)


def test_usage_counts_one_tenant_as_the_limits_do() -> None:
    a, b, other = _fn("a"), _fn("b", gib=10), _fn("x", tenant="globex")
    insts = [_inst("1", a, InstanceState.INSTANCE_STATE_RUNNING), _inst("2", b, InstanceState.INSTANCE_STATE_CREATING),
             _inst("3", a, InstanceState.INSTANCE_STATE_STANDBY), _inst("4", a, InstanceState.INSTANCE_STATE_ENDED),
             _inst("5", other, InstanceState.INSTANCE_STATE_RUNNING)]
    snaps = [Snapshot(function_id=a.id, total_bytes=7), Snapshot(function_id=other.id, total_bytes=100)]
    assert quota.usage("acme", [a, b, other], insts, snaps) == quota.Usage(
        functions=2, standbys=1, snapshot_bytes=7, gpu_memory_bytes=30 * GIB)


@pytest.mark.parametrize(("fn", "limits", "use", "others", "creating", "refused"), [
    (_fn("a"), quota.Limits(functions=2), quota.Usage(functions=2), [], True, "quota functions of tenant acme exceeded: limit 2, in use 2"),
    (_fn("a"), quota.Limits(functions=2), quota.Usage(functions=2), [], False, None),  # an update adds none
    (_fn("a", standby_per_node=3), quota.Limits(standbys=2), quota.Usage(), [], True, "quota standbys .* limit 2"),
    (_fn("a", mode=SnapshotMode.SNAPSHOT_MODE_ARENA), quota.Limits(snapshot_bytes=100),
     quota.Usage(snapshot_bytes=100), [], False, "quota snapshot_bytes of tenant acme exceeded: limit 100 bytes, in use 100"),
    (_fn("a"), quota.Limits(snapshot_bytes=100), quota.Usage(snapshot_bytes=100), [], False, None),  # needs no snapshot
    (_fn("a", gib=40), quota.Limits(gpu_memory_bytes=30 * GIB), quota.Usage(), [], True, "quota gpu_memory_bytes .* limit 32212254720 bytes"),
    (_fn("a", gib=20, min_instances=1), quota.Limits(gpu_memory_bytes=50 * GIB), quota.Usage(),
     [_fn("b", gib=20, min_instances=2)], True, "in use 42949672960, this needs 21474836480 more"),
    (_fn("a", gib=20, min_instances=1), quota.Limits(gpu_memory_bytes=60 * GIB), quota.Usage(),
     [_fn("b", gib=20, min_instances=2)], True, None),
    (_fn("a", gib=80, min_instances=4), quota.Limits(), quota.Usage(functions=1000), [], True, None),  # 0: no limit
])
def test_spec_checks(fn: Function, limits: quota.Limits, use: quota.Usage, others: list[Function], creating: bool,
                     refused: str | None) -> None:
    needs_snapshot = fn.spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_ARENA
    if refused is None:
        quota.check_spec(fn, limits, use, others, needs_snapshot, creating)
        return
    with pytest.raises(errors.ResourceExhausted, match=refused):
        quota.check_spec(fn, limits, use, others, needs_snapshot, creating)


# Quotas where instances are made (starter, controller), over the fakes -------------------------

class Core:
    def __init__(self, limits: quota.Limits) -> None:
        self.etcd = FakeEtcd()
        self.nodes = FakeNodeClient(self.etcd)
        self.state = ClusterState(self.etcd)
        self.table = ClaimTable(time.monotonic, 30.0)
        self.quotas = quota.Quotas(limits, self.state.quota)
        self.starter = Starter(self.state, self.nodes, self.table, 30.0, self.quotas)
        self.broker = ClaimBroker(self.state, self.starter, self.table)
        self.controller = Controller(self.state, self.starter, self.broker, QueueDepths(time.monotonic),
                                     SnapshotBuilder(self.state, self.starter, 3), 0.05)

    async def put(self, key: str, value: object) -> None:
        await self.etcd.put(key, value)  # type: ignore[arg-type]
        for _ in range(100):
            if any(key in m.items for m in self.state.mirrors.values()):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the mirror never showed {key}")


@pytest.fixture
async def core() -> AsyncIterator[Core]:
    c = Core(quota.Limits(gpu_memory_bytes=40 * GIB, standbys=1))
    await c.state.start()
    node = Node(name="node-a", address="node-a:7070", gpus=[Gpu(index=0, memory_total_bytes=80 * GIB)])
    node.heartbeat_time.FromNanoseconds(time.time_ns())
    await c.put(keys.node_key("node-a"), node)
    yield c
    await c.controller.stop()
    await c.state.stop()


async def test_a_start_past_the_tenants_gpu_quota_is_refused_before_any_node_call(core: Core) -> None:
    a, b, other = _fn("a", gib=30), _fn("b", gib=20), _fn("x", tenant="globex", gib=30)
    for fn in (a, b, other):
        await core.put(keys.function_key(fn.id), fn)
    assert await core.starter.start(a) is not None  # 30 of 40 GiB
    calls = len(core.nodes.calls)
    with pytest.raises(errors.ResourceExhausted, match="quota gpu_memory_bytes of tenant acme exceeded: "
                                                       "limit 42949672960 bytes, in use 32212254720"):
        await core.starter.start(b)
    assert len(core.nodes.calls) == calls
    assert await core.starter.start(other) is not None  # another tenant's use is its own
    await core.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_gpu_memory_bytes=0))  # operator lifts it
    assert await core.starter.start(b) is not None


async def test_the_controller_starts_no_standby_past_the_tenants_quota(core: Core) -> None:
    a, b = (_fn(n, standby_per_node=1, mode=SnapshotMode.SNAPSHOT_MODE_PROCESS) for n in ("a", "b"))
    for fn in (a, b):
        await core.put(keys.function_key(fn.id), fn)
        await core.put(keys.snapshot_key(fn.id, 1), Snapshot(id=keys.snapshot_id(fn.id, 1), function_id=fn.id,
                                                              revision=1, state=SnapshotState.SNAPSHOT_STATE_READY))
    for _ in range(10):
        core.controller.reconcile()
        await asyncio.sleep(0.05)
    standbys = [i for i in core.state.instances() if i.state == InstanceState.INSTANCE_STATE_STANDBY]
    assert len(standbys) == 1, [(i.function_id, i.state) for i in core.state.instances()]
    await core.put(keys.quota_key("acme"), TenantQuota(tenant="acme", max_standbys=2))
    for _ in range(10):
        core.controller.reconcile()
        await asyncio.sleep(0.05)
    assert sorted(i.function_id for i in core.state.instances()
                  if i.state == InstanceState.INSTANCE_STATE_STANDBY) == [a.id, b.id]


# Audit -------------------------------------------------------------------------------------

def test_audit_lines_are_json_with_who_what_when_and_outcome(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "logs" / "audit.log"))  # the folder is made
    log.record(Caller("0123456789ab", "acme", False), "ipv4:1.2.3.4:5", "DeleteFunction", "acme/d/a", "OK")
    log.record(None, "ipv4:1.2.3.4:6", "ListNodes", "", "UNAUTHENTICATED", "no credentials")
    log.close()
    first, second = (json.loads(line) for line in (tmp_path / "logs" / "audit.log").read_text().splitlines())
    assert first["token_id"] == "0123456789ab" and first["tenant"] == "acme" and first["method"] == "DeleteFunction"
    assert first["resource"] == "acme/d/a" and first["outcome"] == "OK" and first["time"].endswith("Z")
    assert second["token_id"] is None and second["outcome"] == "UNAUTHENTICATED" and second["message"] == "no credentials"


def test_the_audit_log_rotates_within_its_size_cap(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.log"), max_bytes=2000, backups=2)
    for n in range(200):
        log.record(None, "peer", "CreateFunction", f"acme/d/f{n}", "PERMISSION_DENIED")
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    assert "acme/d/f199" in (tmp_path / "audit.log").read_text()


# The gateway's key table -------------------------------------------------------------------

def test_the_key_table_admits_live_keys_by_id_and_hmac() -> None:
    secret = b"k" * 32
    key = credentials.new_credential(credentials.API_KEY_PREFIX)
    table = ApiKeyTable(secret)
    table.replace([(key.id, "acme", credentials.hmac_digest(secret, key.text))])
    store = KeyStore.parse([hash_entry("sk-legacy", "old")]).with_table(table)
    assert store.lookup(key.text) == Principal("acme", key.id)
    assert store.lookup(key.text[:-1] + ("A" if key.text[-1] != "A" else "B")) is None  # the secret part is checked
    assert store.lookup("sk-legacy") is not None  # config-file keys still work
    forged = ApiKeyTable(b"x" * 32)
    forged.replace([(key.id, "acme", credentials.hmac_digest(secret, key.text))])
    assert forged.lookup(key.text) is None  # another secret: the stored digest is useless
    table.replace([])  # revoked
    assert store.lookup(key.text) is None
    assert bool(KeyStore().with_table(table)) and not KeyStore()  # a key table turns auth on, even empty
