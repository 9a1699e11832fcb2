"""The authorization matrix: every RPC of every service in ``snapwake.v1``, read from the proto
descriptors (so a new RPC is in it the day it is added), called on a real TLS dev cluster:

- with no certificate: on the mutual-TLS port the handshake is refused; on the plaintext health
  port and the scheduler's admin port the call is refused UNAUTHENTICATED (SchedulerService on
  the admin port goes on to its bearer-token check, the scheduler's own: test_admin_tokens, with
  no token, a forged one, another tenant's, and the operator's);
- with a certificate of every identity the method is not for (every other role, and a nodeagent
  of another node on a blobstore): PERMISSION_DENIED;
- with the right identity: anything but UNAUTHENTICATED or PERMISSION_DENIED (the empty request
  may well be refused later, as INVALID_ARGUMENT or NOT_FOUND).

The expectations (RIGHT) are written here from the design, not read from ``snapwake.authz``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

import snapwake.v1
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.grpcclient import blocking_channel
from snapwake.pki import ROLES, Identity
from snapwake.testing import wait_for

pytestmark = pytest.mark.integration

REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
T = 10.0
NODE = "node-0"


def all_methods() -> list[MethodDescriptor]:
    """Every RPC of every service in every ``snapwake.v1`` module."""
    found = []
    for info in pkgutil.iter_modules(snapwake.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"snapwake.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                found.extend(service.methods)
    return found


# Which process serves each service; a new service must be added here (the test fails until it is).
HOSTS = {"snapwake.v1.SchedulerService": "scheduler", "snapwake.v1.ClaimService": "scheduler",
         "snapwake.v1.NodeAgentService": "nodeagent", "snapwake.v1.BlobstoreService": "blobstore"}
GATEWAY_READS = {"ListFunctions", "ListInstances", "ListNodes", "ListSnapshots"}  # the dashboard's
PEER_READS = {"GetSnapshot", "StatSnapshot"}  # the blobstore peer fetch


def right(method: MethodDescriptor) -> set[Identity | None]:
    """Who may call ``method`` (None: a caller without a certificate, on the admin port)."""
    service, name = method.containing_service.full_name, method.name
    if service == "snapwake.v1.ClaimService":
        return {Identity("gateway", "gateway")}
    if service == "snapwake.v1.SchedulerService":
        return {None, Identity("admin", "ops")} | ({Identity("gateway", "gateway")} if name in GATEWAY_READS else set())
    if service == "snapwake.v1.NodeAgentService":
        return {Identity("scheduler", "scheduler")}
    if service == "snapwake.v1.BlobstoreService":
        return {Identity("nodeagent", NODE)} | ({Identity("blobstore", "node-9")} if name in PEER_READS else set())
    raise AssertionError(f"{service}: add it to HOSTS and to right()")


# Every certificate the matrix presents: each role once, and a nodeagent of another node.
CALLERS = [Identity(role, {"nodeagent": NODE, "blobstore": "node-9", "scheduler": "scheduler",
                           "gateway": "gateway", "admin": "ops"}.get(role, "x")) for role in ROLES if role != "etcd"]
CALLERS.append(Identity("nodeagent", "node-9"))

# Bearer-token cases on SchedulerService over the admin port (no certificate), each with the
# code expected (None: not refused). "globex" asks about tenant acme's resources (acme_request).
TOKEN_CASES = ["none", "forged", "globex", "operator"]
TENANT = "acme"


def acme_request(method: MethodDescriptor) -> Any:
    """A request for ``method`` that names tenant acme's resources wherever it names any."""
    request = message_factory.GetMessageClass(method.input_type)()
    fields = request.DESCRIPTOR.fields_by_name
    for name, value in (("function_id", f"{TENANT}/default/fn"), ("tenant", TENANT), ("instance_id", "i-0123456789ab"),
                        ("node", NODE)):
        if name in fields:
            setattr(request, name, value)
    if "spec" in fields:
        request.spec.tenant, request.spec.namespace, request.spec.name = TENANT, "default", "fn"
    return request


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(var_dir=tmp_path_factory.mktemp("authz"), gateway_port=0, scheduler_port=0,
                           nodeagent_port=0, blobstore_port=0, etcd_port=0, admin_auth=True)
    with Cluster(config) as c:
        yield c


def invoke(ch: grpc.Channel, method: MethodDescriptor, metadata: list[tuple[str, str]] | None = None,
           request: Any = None) -> Outcome:
    """Calls ``method`` with ``request``, else an empty one (an empty stream for a client-streaming
    one)."""
    request = request or message_factory.GetMessageClass(method.input_type)()
    reply = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
            (True, False): ch.stream_unary, (True, True): ch.stream_stream}[(method.client_streaming,
                                                                             method.server_streaming)]
    rpc: Any = kind(path, request_serializer=type(request).SerializeToString, response_deserializer=reply.FromString)
    try:
        result = rpc(iter(()) if method.client_streaming else request, timeout=T, metadata=metadata)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "")
    return Outcome(grpc.StatusCode.OK, "")


class Channels:
    """One channel per (port, certificate), reused across the matrix."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.open = cluster, {}

    def get(self, address: str, identity: Identity | None, role: str, plaintext: bool = False) -> grpc.Channel:
        key = (address, identity, plaintext)
        if key not in self.open:
            tls = None if plaintext else self.cluster.client_tls(identity)
            self.open[key] = blocking_channel(address, tls, server_role=role if tls else "")
        return self.open[key]


@pytest.fixture(scope="module")
def channels(cluster: Cluster) -> Iterator[Channels]:
    found = Channels(cluster)
    yield found
    for ch in found.open.values():
        ch.close()


METHODS = all_methods()
IDS = [f"{m.containing_service.name}.{m.name}" for m in METHODS]


def test_the_matrix_covers_every_service() -> None:
    services = {m.containing_service.full_name for m in METHODS}
    assert services == set(HOSTS), f"new services need a host in HOSTS: {services - set(HOSTS)}"
    # Every rpc the .proto files declare is in the matrix (the generated code is current).
    protos = (Path(__file__).resolve().parents[2] / "proto" / "snapwake" / "v1").glob("*.proto")
    declared = sum(len(re.findall(r"^\s*rpc\s", p.read_text(), re.M)) for p in protos)
    assert len(METHODS) == declared > 0


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_no_certificate_is_refused(method: MethodDescriptor, cluster: Cluster, channels: Channels) -> None:
    host = HOSTS[method.containing_service.full_name]
    # The mutual-TLS port: no handshake without a certificate.
    got = invoke(channels.get(cluster.internal_address(host), None, host), method)
    assert got.code == grpc.StatusCode.UNAVAILABLE, got
    # The plaintext health port: nothing but health.
    got = invoke(channels.get(cluster.health_address(host), None, host, plaintext=True), method)
    assert got.code == grpc.StatusCode.UNAUTHENTICATED and method.name in got.details, got
    if host == "scheduler":  # its admin port: only SchedulerService, which checks the token
        got = invoke(channels.get(cluster.address("scheduler"), None, host), method)
        if None in right(method):
            assert "client certificate" not in got.details, got
        else:
            assert got.code == grpc.StatusCode.UNAUTHENTICATED and "client certificate" in got.details, got


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_wrong_certificate_is_refused_and_the_right_one_is_not(method: MethodDescriptor, cluster: Cluster,
                                                                 channels: Channels, tokens: dict[str, str]) -> None:
    host = HOSTS[method.containing_service.full_name]
    allowed = right(method)
    md = bearer(tokens["operator"])  # SchedulerService's own check wants a token too; others ignore it
    for caller in CALLERS:
        got = invoke(channels.get(cluster.internal_address(host), caller, host), method, md)
        if caller in allowed:  # reached the servicer (UNAVAILABLE here would be a refused handshake)
            assert got.code not in (*REFUSED, grpc.StatusCode.UNAVAILABLE), (caller, got)
        else:
            assert got.code == grpc.StatusCode.PERMISSION_DENIED, (caller, got)
            assert method.name in got.details and str(caller) in got.details, got
    if None in allowed:
        got = invoke(channels.get(cluster.address("scheduler"), None, host), method, md)
        assert got.code not in (*REFUSED, grpc.StatusCode.UNAVAILABLE), got


@pytest.fixture(scope="module")
def tokens(cluster: Cluster, channels: Channels) -> dict[str, str]:
    """Bearer tokens: the operator's (make run's bootstrap), one of tenant globex, a forged one."""
    from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc

    operator = cluster.token_file.read_text().strip()
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channels.get(cluster.address("scheduler"), None, "scheduler"))
    wait_for(lambda: leads(stub, operator), 30, "a scheduler leader", interval=0.2)
    globex = stub.CreateAdminToken(scheduler_pb2.CreateAdminTokenRequest(tenant="globex"), timeout=T,
                                   metadata=[("authorization", f"Bearer {operator}")]).secret
    return {"operator": operator, "globex": globex, "forged": operator[:-4] + "AAAA", "none": ""}


def leads(stub: Any, operator: str) -> bool:
    from snapwake.v1 import scheduler_pb2

    try:
        stub.ListNodes(scheduler_pb2.ListNodesRequest(), timeout=T, metadata=[("authorization", f"Bearer {operator}")])
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return False
    return True


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def expected_for_token(case: str, method: MethodDescriptor) -> grpc.StatusCode | None:
    if case in ("none", "forged"):
        return grpc.StatusCode.UNAUTHENTICATED
    if case == "globex":  # every call naming acme's resources (a list filtered to acme too)
        return grpc.StatusCode.PERMISSION_DENIED
    return None


@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("method", [m for m in METHODS if m.containing_service.name == "SchedulerService"],
                         ids=[i for i in IDS if i.startswith("SchedulerService.")])
def test_admin_tokens(method: MethodDescriptor, case: str, cluster: Cluster, channels: Channels,
                      tokens: dict[str, str]) -> None:
    got = invoke(channels.get(cluster.address("scheduler"), None, "scheduler"), method, bearer(tokens[case]),
                 acme_request(method) if case == "globex" else None)
    expected = expected_for_token(case, method)
    if expected is None:
        assert got.code not in (*REFUSED, grpc.StatusCode.UNAVAILABLE), (case, got)
    else:
        assert got.code == expected, (case, got)


def test_health_answers_on_the_probe_ports_without_credentials(cluster: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in ("scheduler", "nodeagent", "blobstore"):
        with blocking_channel(cluster.health_address(name)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            wait_for(lambda s=stub: s.Check(health_pb2.HealthCheckRequest(), timeout=T).status  # type: ignore[misc]
                     == health_pb2.HealthCheckResponse.SERVING, 10, f"{name} health", interval=0.2)
