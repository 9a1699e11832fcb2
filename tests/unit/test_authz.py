"""snapwake.authz: the decision table, and the TLS settings every service config shares."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.blobstore.config import BlobstoreConfig
from services.gateway.config import GatewayConfig
from services.nodeagent.config import NodeAgentConfig
from services.scheduler.config import SchedulerConfig
from snapwake import pki
from snapwake.authz import Code, Transport, decide
from snapwake.config import ConfigError, load
from snapwake.pki import Identity, create_ca, issue_dir
from snapwake.tlsconfig import TLS_FIELDS

MTLS, ANON, PLAIN = Transport.MUTUAL_TLS, Transport.SERVER_TLS, Transport.PLAINTEXT
V1 = "/snapwake.v1."
GW, SCHED = Identity("gateway", "gw"), Identity("scheduler", "scheduler")
NA1, NA2 = Identity("nodeagent", "node-1"), Identity("nodeagent", "node-2")
BS1, BS2 = Identity("blobstore", "node-1"), Identity("blobstore", "node-2")
ADMIN = Identity("admin", "ops")
OK = None
DENIED, UNAUTH = Code.PERMISSION_DENIED, Code.UNAUTHENTICATED

CASES = [
    # method, transport, caller, server, anonymous services, expected
    (V1 + "ClaimService/AcquireClaim", MTLS, GW, SCHED, (), OK),
    (V1 + "ClaimService/ReportQueue", MTLS, GW, SCHED, (), OK),
    (V1 + "ClaimService/SyncApiKeys", MTLS, GW, SCHED, (), OK),
    (V1 + "ClaimService/SyncApiKeys", MTLS, ADMIN, SCHED, (), DENIED),
    (V1 + "ClaimService/SyncApiKeys", ANON, None, SCHED, ("snapwake.v1.SchedulerService",), UNAUTH),
    (V1 + "ClaimService/AcquireClaim", MTLS, NA1, SCHED, (), DENIED),
    (V1 + "ClaimService/AcquireClaim", MTLS, ADMIN, SCHED, (), DENIED),
    (V1 + "ClaimService/AcquireClaim", ANON, None, SCHED, ("snapwake.v1.SchedulerService",), UNAUTH),
    (V1 + "ClaimService/AcquireClaim", MTLS, None, SCHED, (), UNAUTH),  # a CA-signed cert without identity
    (V1 + "SchedulerService/ListFunctions", MTLS, GW, SCHED, (), OK),
    (V1 + "SchedulerService/CreateFunction", MTLS, GW, SCHED, (), DENIED),
    (V1 + "SchedulerService/CreateFunction", MTLS, ADMIN, SCHED, (), OK),
    (V1 + "SchedulerService/CreateFunction", ANON, None, SCHED, ("snapwake.v1.SchedulerService",), OK),
    (V1 + "SchedulerService/CreateFunction", ANON, None, SCHED, (), UNAUTH),
    (V1 + "SchedulerService/ListFunctions", PLAIN, None, SCHED, ("snapwake.v1.SchedulerService",), UNAUTH),
    (V1 + "NodeAgentService/StartInstance", MTLS, SCHED, NA1, (), OK),
    (V1 + "NodeAgentService/StartInstance", MTLS, GW, NA1, (), DENIED),
    (V1 + "NodeAgentService/StartInstance", MTLS, NA2, NA1, (), DENIED),
    (V1 + "BlobstoreService/OpenInstanceHandover", MTLS, NA1, BS1, (), OK),
    (V1 + "BlobstoreService/PutSnapshot", MTLS, NA1, BS1, (), OK),
    (V1 + "BlobstoreService/PrewarmSnapshot", MTLS, NA2, BS1, (), DENIED),  # another node's blobstore
    (V1 + "BlobstoreService/GetSnapshot", MTLS, BS2, BS1, (), OK),  # a peer
    (V1 + "BlobstoreService/StatSnapshot", MTLS, BS2, BS1, (), OK),
    (V1 + "BlobstoreService/DeleteSnapshot", MTLS, BS2, BS1, (), DENIED),
    (V1 + "BlobstoreService/PutSnapshot", MTLS, BS1, BS1, (), DENIED),  # a peer pushes nothing
    (V1 + "BlobstoreService/GetSnapshot", MTLS, SCHED, BS1, (), DENIED),
    (V1 + "BlobstoreService/Unknown", MTLS, NA1, BS1, (), OK),  # no such method: gRPC answers UNIMPLEMENTED
    (V1 + "NewService/Anything", MTLS, SCHED, SCHED, (), DENIED),  # default deny
    ("/grpc.health.v1.Health/Check", PLAIN, None, BS1, (), OK),
    ("/grpc.health.v1.Health/Watch", ANON, None, SCHED, (), OK),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", PLAIN, None, BS1, (), UNAUTH),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", ANON, None, SCHED, (), OK),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", MTLS, GW, BS1, (), OK),
]


@pytest.mark.parametrize(("method", "transport", "caller", "server", "anonymous", "expected"), CASES)
def test_decide(method: str, transport: Transport, caller: Identity | None, server: Identity,
                anonymous: tuple[str, ...], expected: Code | None) -> None:
    refusal = decide(method, transport, caller, server, anonymous)
    assert (refusal.code if refusal else None) == expected, refusal
    if refusal is not None:  # the message names the method, and the identity where there is one
        assert method in refusal.message
        assert caller is None or str(caller) in refusal.message


def test_another_nodes_refusal_names_both_nodes() -> None:
    refusal = decide(V1 + "BlobstoreService/PrewarmSnapshot", MTLS, NA2, BS1)
    assert refusal is not None and "nodeagent/node-2" in refusal.message and "blobstore/node-1" in refusal.message


# --- the TLS settings of every service config -------------------------------------------------

CONFIGS = [(GatewayConfig, "gateway"), (SchedulerConfig, "scheduler"), (NodeAgentConfig, "nodeagent"),
           (BlobstoreConfig, "blobstore")]


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    ca = create_ca(base)
    for role, name in [("gateway", "gw"), ("scheduler", "s"), ("nodeagent", "node-1"), ("blobstore", "node-1")]:
        issue_dir(ca, base / role, Identity(role, name))
    return base


@pytest.mark.parametrize(("cls", "role"), CONFIGS)
def test_every_service_takes_its_tls_files_from_a_folder(cls: type, role: str, pkidir: Path) -> None:
    assert set(TLS_FIELDS) - {"health_listen"} <= {f.name for f in dataclasses.fields(cls)}
    name = ["--name", "node-1"] if role == "nodeagent" else []
    cfg = load(cls, ["--tls-dir", str(pkidir / role), *name, *_etcd_plain(cls)], env={})
    tls = cfg.server_tls()
    assert tls is not None and tls.identity.role == role and tls.ca == (pkidir / "ca.crt").read_bytes()
    assert cfg.plaintext_refusal() is None


def _etcd_plain(cls: type) -> list[str]:
    """Services that talk to etcd need its TLS keys too (another test's matter): plaintext here."""
    return ["--etcd-plaintext", "true"] if "etcd_plaintext" in {f.name for f in dataclasses.fields(cls)} else []


@pytest.mark.parametrize(("cls", "role"), CONFIGS)
def test_without_a_certificate_a_service_may_start_only_with_dev_plaintext(cls: type, role: str) -> None:
    refusal = load(cls, [*_etcd_plain(cls)], env={}).plaintext_refusal()
    assert refusal is not None and "tls_dir" in refusal and "--dev-plaintext" in refusal
    plain = load(cls, ["--dev-plaintext", *_etcd_plain(cls)], env={})
    assert plain.plaintext_refusal() is None and plain.server_tls() is None


@pytest.mark.parametrize(("argv", "needle"), [
    (["--tls-dir", "{pki}/gateway"], "tls_cert: .* is gateway/gw, not blobstore/<name>"),  # another role's certificate
    (["--tls-dir", "{pki}/nowhere"], "tls_ca: .* is not a readable file"),
    (["--tls-ca", "{pki}/ca.crt"], "tls_cert: not set"),
    (["--tls-dir", "{pki}/blobstore", "--dev-plaintext"], "dev_plaintext: set together with a certificate"),
    (["--tls-dir", "{pki}/blobstore", "--tls-cert", "{pki}/ca.crt"], "tls_cert: .* carries no spiffe"),
    (["--tls-dir", "{pki}/blobstore", "--health-listen", "nowhere"], "health_listen: expected host:port"),
])
def test_bad_tls_keys_are_named(argv: list[str], needle: str, pkidir: Path) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(BlobstoreConfig, [a.format(pki=pkidir) for a in argv], env={})


def test_a_nodeagent_certificate_must_be_a_nodeagents(pkidir: Path) -> None:
    with pytest.raises(ConfigError, match="blobstore/node-1, not nodeagent"):
        load(NodeAgentConfig, ["--tls-dir", str(pkidir / "blobstore"), "--name", "node-1"], env={})


def test_the_pki_command_writes_a_tls_dir_per_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pki.main([str(tmp_path), "scheduler/scheduler=10.0.0.1,sched.example", "nodeagent/node-1"]) == 0
    folder = tmp_path / "scheduler-scheduler"
    assert capsys.readouterr().out.split() == [str(folder), str(tmp_path / "nodeagent-node-1")]
    assert (folder / "ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert pki.identity_from_pem((folder / "tls.crt").read_bytes()) == Identity("scheduler", "scheduler")
    kept = (folder / "tls.crt").read_bytes()
    assert pki.main([str(tmp_path), "scheduler/scheduler"]) == 0 and (folder / "tls.crt").read_bytes() == kept
    assert pki.main([str(tmp_path), "scheduler"]) == 2  # no name
    assert "role/name" in capsys.readouterr().err
