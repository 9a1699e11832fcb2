"""etcd with client-certificate TLS and auth (``snapwake.etcdauth``), against a real etcd: each
service's certificate reaches only its key prefixes, a node only its own node key and instance
records, and a client
without a certificate of the cluster CA gets nowhere."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.server import _etcd_tls
from services.scheduler.config import SchedulerConfig
from snapwake import errors, etcdauth, keys
from snapwake.etcd import Etcd, EtcdAuthApi, EtcdTls, KeyPermission
from snapwake.pki import Identity, create_ca, identity_from_pem, issue
from snapwake.testing import ETCD_ROOT, EtcdProcess
from snapwake.v1.types_pb2 import Function, Instance, Node, NodeCordon, Snapshot

pytestmark = pytest.mark.timeout(60)

SCHEDULER = Identity("scheduler", "s0")
NODE_A, NODE_B = Identity("nodeagent", "node-a"), Identity("nodeagent", "node-b")
GATEWAY, BLOBSTORE = Identity("gateway", "g0"), Identity("blobstore", "node-a")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd over TLS with auth on, set up through the command line as an operator would."""
    tmp = tmp_path_factory.mktemp("etcdauth")
    with EtcdProcess(tmp / "etcd", pki=tmp / "pki") as server:
        root = server.client_tls()
        argv = ["--etcd", server.address, "--etcd-ca", root.ca, "--etcd-cert", root.cert, "--etcd-key", root.key,
                "--users", ",".join(str(i) for i in (SCHEDULER, NODE_A, NODE_B))]
        assert etcdauth.main(argv) == 0
        yield server


@contextlib.asynccontextmanager
async def as_(server: EtcdProcess, identity: Identity) -> AsyncIterator[Etcd]:
    async with Etcd.connect(server.address, timeout=3, tls=server.client_tls(identity)) as etcd:
        yield etcd


async def denied(call: object) -> None:
    with pytest.raises(errors.SnapwakeError, match="permission denied"):
        await call  # type: ignore[misc]


def test_bootstrap_again_changes_nothing_and_narrows_what_was_widened(secured: EtcdProcess) -> None:
    users = [SCHEDULER, NODE_A, NODE_B]
    again = etcdauth.bootstrap(secured.address, secured.client_tls(), users)
    assert (again.created, again.granted, again.revoked) == ([], [], [])
    # Someone widened the scheduler role and gave a node the scheduler's: a run puts it back.
    tls = secured.client_tls()
    with EtcdAuthApi(secured.address, tls) as api:
        api.grant("scheduler", KeyPermission(b"/", b"\0", write=True))
        api.grant_role(str(NODE_A), "scheduler")
    fixed = etcdauth.bootstrap(secured.address, tls, users)
    assert fixed.revoked == ["scheduler: /", f"{NODE_A}: role scheduler"]
    assert fixed.granted == []


async def test_scheduler_writes_desired_state_and_only_reads_actual_state(secured: EtcdProcess) -> None:
    async with as_(secured, SCHEDULER) as etcd:
        fn = Function(id="t/n/f")
        assert await etcd.create(keys.function_key("t/n/auth-f"), fn)
        await etcd.put(keys.cordon_key("node-a"), NodeCordon(node="node-a"))
        await etcd.put(keys.snapshot_key("t/n/auth-f", 1), Snapshot(id="t/n/auth-f@1"))
        lease = await etcd.grant_lease(5)
        assert await etcd.create(keys.LEADER, Node(name="s0"), lease=lease)
        assert await etcd.revoke_lease(lease)
        await etcd.put(keys.intent_key("i-auth"), Instance(id="i-auth", node="node-a"))
        await etcd.put(keys.snapshot_pin_key("t/n/auth-f", 1), Snapshot(id="t/n/auth-f@1", manifest_digest="sha256:a"))
        assert [e.key for e in await etcd.list(keys.INTENTS, Instance)] == [keys.intent_key("i-auth")]
        await etcd.list(keys.NODES, Node)
        await etcd.list(keys.INSTANCES, Node)
        await denied(etcd.put(keys.node_key("node-a"), Node(name="node-a")))
        await denied(etcd.put(keys.instance_key("node-a", "i-1"), Node()))
        await denied(etcd.put("/elsewhere", Node()))
        await denied(etcd.get("/elsewhere", Node))


async def test_gateway_and_blobstore_certificates_reach_no_key(secured: EtcdProcess) -> None:
    for identity in (GATEWAY, BLOBSTORE):
        async with as_(secured, identity) as etcd:  # a valid certificate connects ...
            await denied(etcd.put(keys.function_key("t/n/by-gateway"), Function()))  # ... but has no user
            await denied(etcd.get(keys.function_key("t/n/auth-f"), Function))
            await denied(etcd.list(keys.PREFIX, Function))


async def test_node_writes_only_its_own_node_key_and_instance_records(secured: EtcdProcess) -> None:
    async with as_(secured, NODE_A) as a, as_(secured, NODE_B) as b:
        lease_a, lease_b = await a.grant_lease(5), await b.grant_lease(5)
        await a.put(keys.node_key("node-a"), Node(name="node-a"), lease=lease_a)
        await b.put(keys.node_key("node-b"), Node(name="node-b"), lease=lease_b)
        await denied(a.put(keys.node_key("node-b"), Node(name="node-b")))
        await denied(a.delete(keys.node_key("node-b")))
        await denied(a.put(keys.node_key("node-a2"), Node()))  # its name is no prefix of others'
        await denied(a.put(keys.node_key("node-"), Node()))
        await denied(a.revoke_lease(lease_b))  # the lease holds node-b's key
        await denied(a.put(keys.function_key("t/n/by-node"), Function()))
        await denied(a.put(keys.cordon_key("node-a"), NodeCordon()))  # no uncordoning itself
        await denied(a.put(keys.LEADER, Node()))
        assert [e.key for e in await a.list(keys.NODES, Node)] == [keys.node_key("node-a"), keys.node_key("node-b")]
        await a.list(keys.FUNCTIONS, Function)
        # Instance records: its own prefix only; another node's it can neither write, delete nor read.
        await a.put(keys.instance_key("node-a", "i-auth"), Node(), lease=lease_a)
        await b.put(keys.instance_key("node-b", "i-auth-b"), Node(), lease=lease_b)
        assert [e.key for e in await a.list(keys.instance_prefix("node-a"), Node)] == [
            keys.instance_key("node-a", "i-auth")]
        await denied(a.put(keys.instance_key("node-b", "i-auth-b"), Node(name="forged")))
        await denied(a.put(keys.instance_key("node-b", "i-new"), Node()))
        await denied(a.delete(keys.instance_key("node-b", "i-auth-b")))
        await denied(a.get(keys.instance_key("node-b", "i-auth-b"), Node))
        await denied(a.list(keys.INSTANCES, Node))
        await denied(a.put(keys.instance_key("node-a2", "i-x"), Node()))  # its name is no prefix of others'
        await denied(a.put(keys.INSTANCES + "i-flat", Node()))  # nor the old, node-less layout
        await a.put(keys.snapshot_key("t/n/auth-f", 2), Snapshot())  # the residual: snapshots/ are shared
        # The scheduler's intents (what it asked nodes to start): no node writes or reads them.
        await denied(a.put(keys.intent_key("i-made-up"), Instance(id="i-made-up", node="node-a")))
        await denied(a.delete(keys.intent_key("i-auth")))
        await denied(a.get(keys.intent_key("i-auth"), Instance))
        # The manifest digests the scheduler pinned: a node reads them, never writes them.
        pinned = await a.get(keys.snapshot_pin_key("t/n/auth-f", 1), Snapshot)
        assert pinned is not None and pinned.value.manifest_digest == "sha256:a"  # type: ignore[attr-defined]
        await denied(a.put(keys.snapshot_pin_key("t/n/auth-f", 1), Snapshot(manifest_digest="sha256:evil")))
        await denied(a.delete(keys.snapshot_pin_key("t/n/auth-f", 1)))
        assert await b.revoke_lease(lease_b) and await a.revoke_lease(lease_a)


def _server_auth_only(tls: EtcdTls) -> grpc.ChannelCredentials:
    """TLS that checks etcd's certificate but presents none."""
    return grpc.ssl_channel_credentials(root_certificates=Path(tls.ca).read_bytes())


async def test_client_without_a_certificate_of_the_ca_cannot_connect(secured: EtcdProcess, tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable):
        async with Etcd.connect(secured.address, timeout=2):  # plaintext
            pass
    root = secured.client_tls()
    no_cert = _server_auth_only(root)
    with pytest.raises(errors.Unavailable):
        async with Etcd.connect(secured.address, timeout=2, credentials=no_cert):
            pass
    other = create_ca(tmp_path / "other")
    forged = issue(other, tmp_path / "other", ETCD_ROOT)  # the root's name, another CA
    with pytest.raises(errors.Unavailable):
        async with Etcd.connect(secured.address, timeout=2,
                                tls=EtcdTls(root.ca, str(forged.cert), str(forged.key))):
            pass


async def test_bad_tls_files_are_named(secured: EtcdProcess, tmp_path: Path) -> None:
    root = secured.client_tls()
    with pytest.raises(errors.InvalidArgument, match="etcd_key: cannot read .*nope"):
        async with Etcd.connect(secured.address, tls=EtcdTls(root.ca, root.cert, str(tmp_path / "nope"))):
            pass
    (tmp_path / "junk").write_text("not a pem")
    with pytest.raises(errors.InvalidArgument, match="etcd_cert: .* no PEM certificate"):
        async with Etcd.connect(secured.address, tls=EtcdTls(root.ca, str(tmp_path / "junk"), root.key)):
            pass


def test_nodeagent_refuses_another_nodes_certificate(secured: EtcdProcess) -> None:
    tls = secured.client_tls(NODE_B)
    config = NodeAgentConfig(name="node-a", etcd_ca=tls.ca, etcd_cert=tls.cert, etcd_key=tls.key)
    with pytest.raises(errors.InvalidArgument, match="nodeagent/node-b, not of nodeagent/node-a"):
        _etcd_tls(config)
    own = secured.client_tls(NODE_A)
    assert _etcd_tls(NodeAgentConfig(name="node-a", etcd_ca=own.ca, etcd_cert=own.cert, etcd_key=own.key))


@pytest.mark.parametrize("cls", [SchedulerConfig, NodeAgentConfig])
def test_plaintext_etcd_needs_the_dev_flag(cls: type[SchedulerConfig] | type[NodeAgentConfig]) -> None:
    problems = cls().validate()
    assert [p.split(":")[0] for p in problems if p.startswith("etcd_")] == ["etcd_ca", "etcd_cert", "etcd_key"]
    assert not [p for p in cls(etcd_plaintext=True).validate() if p.startswith("etcd_")]
    assert [p for p in cls(etcd_plaintext=True, etcd_ca="/ca.crt").validate() if p.startswith("etcd_plaintext")]


def test_roles_follow_the_identity() -> None:
    assert etcdauth.roles_of(NODE_A) == ("nodeagent", "nodeagent/node-a")
    for identity in (GATEWAY, BLOBSTORE):
        with pytest.raises(ValueError, match="never talks to etcd"):
            etcdauth.roles_of(identity)
    assert etcdauth.main(["--etcd", "127.0.0.1:1", "--etcd-plaintext", "true"]) == 2


def test_compose_certificate_folders_hold_one_identity_each(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    (etcd_dir,) = etcdauth.write_identity_dirs(pki, ["etcd/etcd"], hosts=["etcd"])
    (node_dir,) = etcdauth.write_identity_dirs(pki, ["nodeagent/node-1"])
    assert sorted(p.name for p in node_dir.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert (node_dir / "tls.key").stat().st_mode & 0o077 == 0
    assert identity_from_pem((node_dir / "tls.crt").read_bytes()) == Identity("nodeagent", "node-1")
    sans = x509.load_pem_x509_certificate((etcd_dir / "tls.crt").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "etcd" in sans.get_values_for_type(x509.DNSName)
    before = (node_dir / "tls.crt").read_bytes()
    etcdauth.write_identity_dirs(pki, ["nodeagent/node-1"])  # kept, not reissued
    assert (node_dir / "tls.crt").read_bytes() == before
    assert EtcdTls(str(node_dir / "ca.crt"), str(node_dir / "tls.crt"), str(node_dir / "tls.key")).credentials()
