"""Who may call which gRPC method: one table, default deny.

A caller is identified only by the certificate it presented on a mutual-TLS port (its SPIFFE
URI, ``snapwake.pki``), never by anything in a request. Each server decides for every call from:

- how the caller came in (``Transport``): with a verified client certificate (the mutual-TLS
  port every service serves), over server-authenticated TLS without one (the scheduler's admin
  port: CLI, grpcurl, dashboard, who carry a bearer token that ``SchedulerService`` itself
  checks), or in plaintext (the probe port: ``grpc.health.v1`` only);
- the identity in the certificate, and the server's own (a nodeagent of node X may use only the
  blobstore whose identity is ``blobstore/X``).

``decide`` answers ``None`` (allowed) or a ``Refusal`` carrying UNAUTHENTICATED (no usable
certificate) or PERMISSION_DENIED (an identity this method is not for), with a message naming the
method and the identity. ``snapwake.grpcserver`` applies it to every call.

The table (``GRANTS``) lists what each role's code actually calls (grep for the stubs):

| caller | may call |
| --- | --- |
| gateway | ClaimService AcquireClaim/ReleaseClaim/ReportQueue/SyncApiKeys; SchedulerService's reads the dashboard shows |
| scheduler | NodeAgentService (every method) |
| nodeagent/X | BlobstoreService (every method) on blobstore/X only: handover, prewarm, list, put/get |
| blobstore (a peer) | BlobstoreService GetSnapshot and StatSnapshot |
| admin (operator certificate) | SchedulerService |
| no certificate, TLS | SchedulerService on the admin port (its bearer token is checked there) |
| anyone | grpc.health.v1; reflection only over TLS |
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from snapwake.pki import Identity

__all__ = ["GATEWAY_ID_SEPARATOR", "GRANTS", "HEALTH", "REFLECTION", "Code", "Grant", "Refusal", "Transport", "decide",
           "gateway_id_problem", "split_method"]

_V1 = "snapwake.v1."
HEALTH = "grpc.health.v1.Health"
REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
ALL = "*"


class Transport(enum.Enum):
    """How a call arrived."""

    MUTUAL_TLS = "mutual TLS"
    """A client certificate verified against the CA (it may still carry no identity)."""
    SERVER_TLS = "TLS without a client certificate"
    """Server-authenticated TLS (the admin port): an anonymous caller, maybe with a token."""
    PLAINTEXT = "plaintext"
    """The probe port."""


class Code(enum.Enum):
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Grant:
    """``role`` may call ``methods`` (``"*"``: all) of ``service``; ``same_node``: only on the
    server of its own node (caller ``nodeagent/X`` on ``blobstore/X``)."""

    service: str
    methods: tuple[str, ...] | str
    role: str
    same_node: bool = False

    def covers(self, service: str, method: str) -> bool:
        return self.service == service and (self.methods == ALL or method in self.methods)


GRANTS: tuple[Grant, ...] = (
    # Claims, queue reports, and the API-key table the gateways poll (its digests: gateways only).
    Grant(_V1 + "ClaimService", ("AcquireClaim", "ReleaseClaim", "ReportQueue", "SyncApiKeys"), "gateway"),
    # The dashboard's reads (services/gateway/scheduler_client.py).
    Grant(_V1 + "SchedulerService", ("ListFunctions", "ListInstances", "ListNodes", "ListSnapshots"), "gateway"),
    Grant(_V1 + "SchedulerService", ALL, "admin"),
    Grant(_V1 + "NodeAgentService", ALL, "scheduler"),
    Grant(_V1 + "BlobstoreService", ALL, "nodeagent", same_node=True),
    # Peer fetch (services/blobstore/peers.py) and its existence check.
    Grant(_V1 + "BlobstoreService", ("GetSnapshot", "StatSnapshot"), "blobstore"),
)


@dataclass(frozen=True)
class Refusal:
    code: Code
    message: str


GATEWAY_ID_SEPARATOR = ":"
"""Between a gateway certificate's name and a replica's suffix in a ``gateway_id``; not a name
character (``snapwake.pki``), so no certificate's name can begin another's ids."""


def gateway_id_problem(caller: Identity, gateway_id: str) -> str | None:
    """Why ``caller`` may not speak as ``gateway_id``; None if it may.

    The scheduler records claims and queue reports as owned by the ``gateway_id`` a gateway
    sends. On mutual TLS that id is tied to the certificate: it is the certificate's name, or the
    name, ``GATEWAY_ID_SEPARATOR`` and a suffix (replicas sharing one certificate, as a
    Kubernetes Deployment's do, each add their own). So a gateway's certificate cannot claim,
    release or report as another gateway, whatever id it sends."""
    if gateway_id == caller.name or gateway_id.startswith(caller.name + GATEWAY_ID_SEPARATOR):
        return None
    return (f"gateway_id {gateway_id!r} is not {caller}'s: it must be its certificate's name {caller.name!r} "
            f"or {caller.name + GATEWAY_ID_SEPARATOR}<replica>")


def split_method(full: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def decide(full_method: str, transport: Transport, caller: Identity | None, server: Identity | None,
           anonymous_services: Collection[str] = (), grants: tuple[Grant, ...] = GRANTS) -> Refusal | None:
    """None if the call may go on; else why not. ``anonymous_services``: services this server
    offers to TLS callers without a certificate (the scheduler's SchedulerService)."""
    service, method = split_method(full_method)
    if service == HEALTH:
        return None
    if transport is Transport.PLAINTEXT:
        return Refusal(Code.UNAUTHENTICATED, f"{full_method}: this port answers only {HEALTH} without TLS; "
                                             "call the TLS port with a client certificate")
    if service in REFLECTION:
        return None
    if transport is Transport.SERVER_TLS:
        if service in anonymous_services:
            return None
        return Refusal(Code.UNAUTHENTICATED, f"{full_method} needs a client certificate (called without one)")
    if caller is None:
        return Refusal(Code.UNAUTHENTICATED,
                       f"{full_method}: the client certificate carries no spiffe://snapwake/<role>/<name> identity")
    for grant in grants:
        if grant.role != caller.role or not grant.covers(service, method):
            continue
        if grant.same_node and (server is None or server.name != caller.name):
            return Refusal(Code.PERMISSION_DENIED, f"{full_method}: {caller} may call it only on its own node's "
                                                   f"{server.role if server else 'server'}, not on {server}")
        return None
    return Refusal(Code.PERMISSION_DENIED, f"{full_method}: not allowed for {caller}")
