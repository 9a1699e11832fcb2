"""The authorization matrix: every RPC of every service in ``snapwake.v1``, read from the proto
descriptors (so a new RPC is in it the day it is added), called on a real TLS dev cluster:

- with no certificate: on the mutual-TLS port the handshake is refused; on the plaintext health
  port and the scheduler's admin port the call is refused UNAUTHENTICATED (SchedulerService on
  the admin port goes on to its bearer-token check: ADMIN_TOKEN_CASES);
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

# Bearer-token cases on SchedulerService over the admin port (no certificate): the tenancy work
# extends this with (label, metadata, expected code or None for "not refused"), e.g.
#   ("no token", [], grpc.StatusCode.UNAUTHENTICATED),
#   ("another tenant's token", [("authorization", f"Bearer {other}")], grpc.StatusCode.PERMISSION_DENIED),
#   ("the right token", [("authorization", f"Bearer {mine}")], None),
# Until then a call without a certificate must pass the certificate check (reach the servicer).
ADMIN_TOKEN_CASES: list[tuple[str, list[tuple[str, str]], grpc.StatusCode | None]] = []


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(var_dir=tmp_path_factory.mktemp("authz"), gateway_port=0, scheduler_port=0,
                           nodeagent_port=0, blobstore_port=0, etcd_port=0)
    with Cluster(config) as c:
        yield c


def invoke(ch: grpc.Channel, method: MethodDescriptor, metadata: list[tuple[str, str]] | None = None) -> Outcome:
    """Calls ``method`` with an empty request (an empty stream for a client-streaming one)."""
    request = message_factory.GetMessageClass(method.input_type)()
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
                                                                 channels: Channels) -> None:
    host = HOSTS[method.containing_service.full_name]
    allowed = right(method)
    for caller in CALLERS:
        got = invoke(channels.get(cluster.internal_address(host), caller, host), method)
        if caller in allowed:  # reached the servicer (UNAVAILABLE here would be a refused handshake)
            assert got.code not in (*REFUSED, grpc.StatusCode.UNAVAILABLE), (caller, got)
        else:
            assert got.code == grpc.StatusCode.PERMISSION_DENIED, (caller, got)
            assert method.name in got.details and str(caller) in got.details, got
    if None in allowed:
        got = invoke(channels.get(cluster.address("scheduler"), None, host), method)
        assert got.code != grpc.StatusCode.UNAVAILABLE and "client certificate" not in got.details, got


@pytest.mark.parametrize(("label", "metadata", "expected"), ADMIN_TOKEN_CASES or [
    pytest.param("", [], None, marks=pytest.mark.skip(reason="bearer tokens come with the tenancy work"))])
@pytest.mark.parametrize("method", [m for m in METHODS if m.containing_service.name == "SchedulerService"],
                         ids=[i for i in IDS if i.startswith("SchedulerService.")])
def test_admin_tokens(method: MethodDescriptor, label: str, metadata: list[tuple[str, str]],
                      expected: grpc.StatusCode | None, cluster: Cluster, channels: Channels) -> None:
    got = invoke(channels.get(cluster.address("scheduler"), None, "scheduler"), method, metadata)
    if expected is None:
        assert got.code not in REFUSED, (label, got)
    else:
        assert got.code == expected, (label, got)


def test_health_answers_on_the_probe_ports_without_credentials(cluster: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in ("scheduler", "nodeagent", "blobstore"):
        with blocking_channel(cluster.health_address(name)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            wait_for(lambda s=stub: s.Check(health_pb2.HealthCheckRequest(), timeout=T).status  # type: ignore[misc]
                     == health_pb2.HealthCheckResponse.SERVING, 10, f"{name} health", interval=0.2)
