"""TLS and authorization wiring on real gRPC servers: the three ports, what each lets through,
the caller's identity reaching the servicer, server-name checks, and a real blobstore pair
fetching over mutual TLS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.blobstore.testing import put_snapshot, running_blobstore
from snapwake.grpcclient import channel
from snapwake.grpcserver import GrpcServer, caller_identity, peer_identity
from snapwake.pki import Identity, create_ca, issue_dir
from snapwake.tlsconfig import ClientTls, ServerTls
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
T = 5.0
LIST_FUNCTIONS = "/snapwake.v1.SchedulerService/ListFunctions"
ACQUIRE = "/snapwake.v1.ClaimService/AcquireClaim"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    ca = create_ca(base)
    for role, name in [("scheduler", "scheduler"), ("gateway", "gw"), ("nodeagent", "node-a"), ("nodeagent", "node-b"),
                       ("blobstore", "node-a"), ("blobstore", "node-b")]:
        issue_dir(ca, base / f"{role}-{name}", Identity(role, name))
    issue_dir(create_ca(base / "other"), base / "forged", Identity("gateway", "gw"))  # another CA
    return base


def client(pki: Path, folder: str | None) -> ClientTls:
    ca = (pki / "ca.crt").read_bytes()
    if folder is None:
        return ClientTls(ca)
    return ClientTls(ca, (pki / folder / "tls.crt").read_bytes(), (pki / folder / "tls.key").read_bytes())


def server_tls(pki: Path, folder: str) -> ServerTls:
    d = pki / folder
    return ServerTls((d / "ca.crt").read_bytes(), (d / "tls.crt").read_bytes(), (d / "tls.key").read_bytes(),
                     Identity(*folder.split("-", 1)))


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """What the servicer sees of its caller: peer_identity and the context variable."""
    return f"{peer_identity(context)}|{caller_identity.get()}".encode()


@pytest.fixture
async def scheduler_like(pki: Path) -> AsyncIterator[GrpcServer]:
    """A server wired as the scheduler's: mutual TLS, an admin port, a health port; two methods
    answer with the identity they see."""
    server = GrpcServer("127.0.0.1:0", ["snapwake.v1.SchedulerService", "snapwake.v1.ClaimService"],
                        tls=server_tls(pki, "scheduler-scheduler"), admin_bind="127.0.0.1:0",
                        health_bind="127.0.0.1:0", anonymous_services=["snapwake.v1.SchedulerService"])
    for path in (LIST_FUNCTIONS, ACQUIRE):
        service, method = path[1:].split("/")
        server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(_who)})])
    await server.start()
    yield server
    await server.stop(0)


async def _call(port: int, path: str, tls: ClientTls | None, server_role: str = "scheduler") -> str:
    async with channel(f"127.0.0.1:{port}", tls, server_role=server_role if tls else "") as ch:
        return (await ch.unary_unary(path)(b"", timeout=T)).decode()


async def _code(port: int, path: str, tls: ClientTls | None, server_role: str = "scheduler") -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call(port, path, tls, server_role)
    return err.value.code()


async def test_the_servicer_sees_the_callers_identity(scheduler_like: GrpcServer, pki: Path) -> None:
    gw = client(pki, "gateway-gw")
    assert await _call(scheduler_like.port, ACQUIRE, gw) == "gateway/gw|gateway/gw"
    assert await _call(scheduler_like.port, LIST_FUNCTIONS, gw) == "gateway/gw|gateway/gw"


async def test_one_port_cannot_see_optional_client_certificates(scheduler_like: GrpcServer, pki: Path) -> None:
    """Why the scheduler has a separate admin port: with require_client_auth=False gRPC does not
    ask for a certificate, so a caller that has one is anonymous there."""
    gw = client(pki, "gateway-gw")
    assert await _call(scheduler_like.admin_port, LIST_FUNCTIONS, gw) == "None|None"
    assert await _call(scheduler_like.admin_port, LIST_FUNCTIONS, client(pki, None)) == "None|None"
    # ... and so it reaches only the anonymous services there, whatever it holds.
    assert await _code(scheduler_like.admin_port, ACQUIRE, gw) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_mutual_tls_port_refuses_the_handshake_without_a_trusted_certificate(
        scheduler_like: GrpcServer, pki: Path) -> None:
    for tls in (client(pki, None), client(pki, "forged"), None):
        assert await _code(scheduler_like.port, ACQUIRE, tls) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_checks_the_servers_role(scheduler_like: GrpcServer, pki: Path) -> None:
    """The scheduler's certificate is no nodeagent's: a client dialling a nodeagent refuses it."""
    gw = client(pki, "gateway-gw")
    assert await _code(scheduler_like.port, ACQUIRE, gw, server_role="nodeagent") == grpc.StatusCode.UNAVAILABLE
    assert await _call(scheduler_like.port, ACQUIRE, gw, server_role="scheduler") == "gateway/gw|gateway/gw"


async def test_the_health_port_answers_health_only(scheduler_like: GrpcServer) -> None:
    async with channel(f"127.0.0.1:{scheduler_like.health_port}") as ch:
        got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in replies:
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for path in (LIST_FUNCTIONS, ACQUIRE):
        assert await _code(scheduler_like.health_port, path, None) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_admin_port_lists_services_through_reflection(scheduler_like: GrpcServer, pki: Path) -> None:
    async with channel(f"127.0.0.1:{scheduler_like.admin_port}", client(pki, None), server_role="scheduler") as ch:
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T)
        names = [s.name async for r in replies for s in r.list_services_response.service]
    assert {"snapwake.v1.SchedulerService", "snapwake.v1.ClaimService", "grpc.health.v1.Health"} <= set(names)


# --- a real blobstore pair -------------------------------------------------------------------

SID = "acme/default/m@1"
CHUNK = 64 << 10


async def test_blobstores_fetch_from_peers_over_mutual_tls_and_serve_only_their_node(tmp_path: Path, pki: Path) -> None:
    data = bytes(range(256)) * (CHUNK // 128)
    async with running_blobstore(tmp_path / "a", tls_dir=str(pki / "blobstore-node-a")) as a:
        await put_snapshot(a.address, SID, data, CHUNK, tls=client(pki, "nodeagent-node-a"))
        async with running_blobstore(tmp_path / "b", peers=(a.address,), tls_dir=str(pki / "blobstore-node-b")) as b:
            async with channel(b.address, client(pki, "nodeagent-node-b"), server_role="blobstore") as ch:
                warm = await blobstore_pb2_grpc.BlobstoreServiceStub(ch).PrewarmSnapshot(
                    blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=SID), timeout=T)
                assert warm.fetched_from_peer and warm.bytes == len(data)
            # Node a's nodeagent may not use node b's blobstore; a peer may read, not write.
            for who, path in [("nodeagent-node-a", "PrewarmSnapshot"), ("blobstore-node-a", "DeleteSnapshot")]:
                async with channel(b.address, client(pki, who), server_role="blobstore") as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await ch.unary_unary(f"/snapwake.v1.BlobstoreService/{path}")(b"", timeout=T)
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert path in err.value.details() and who.replace("-", "/", 1) in err.value.details()


def test_a_service_without_a_certificate_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.blobstore", "--listen", "127.0.0.1:0",
                           "--dirs", str(tmp_path / "d0")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "tls_dir: no certificate configured" in done.stderr and "--dev-plaintext" in done.stderr
