"""etcd users, roles and permissions per service, and the idempotent bootstrap that sets them up.

etcd runs with ``--client-cert-auth`` and auth enabled: a client must present a certificate of
the cluster CA, and etcd takes its common name (``role/name``, ``snapwake.pki``) as the user
whose roles say which keys it may read and write. Who needs what (every etcd call of the four
services, found by grep; the gateway and the blobstore never talk to etcd, so they get no user
and their certificates are refused every key)::

    role                 read                                    read and write
    scheduler            nodes/, instances/                      functions/, snapshots/, cordons/,
                                                                 intents/, snapshot-pins/, access/,
                                                                 leader (election: create, watch)
    nodeagent            functions/ (fencing), nodes/ (peers),   snapshots/
                         snapshots/, snapshot-pins/
    nodeagent/{node}                                             nodes/{node} (its own key only),
                                                                 instances/{node}/ (its own instances)
    root                 everything: the operator's ``admin/...`` certificate the bootstrap uses

Leases need no grant (etcd 3.4 lets any user take and refresh one); revoking one, or putting a
key under one, needs write permission on every key already attached to it, so a node cannot
revoke another's lease.

Instance records are keyed under their node (``/snapwake/instances/{node}/{id}``), so etcd
itself refuses a node's certificate every other node's instance records: it can neither write,
delete nor read them. The scheduler, for its part, ignores a record whose ``node`` or ``id``
differs from its key (``keys.instance_matches_key``), and one that matches no intent
(``/snapwake/intents/{id}``, which only the scheduler reads and writes): it records what it asks
a node to start (id, node, function, revision) before it asks, and believes only records that
match (``services.scheduler.state``). So a node's certificate cannot make up instances under
its own prefix either (another function, an id the scheduler never minted, an id another node's
instance has): they are ignored, logged once and counted, and never routed to.

Snapshot records (``/snapwake/snapshots/...``) are one record per function revision that every
holding node updates, so any node's certificate can write them. Their manifest digest is no
longer what gets attached: the scheduler pins the digest the node it asked to build the
snapshot recorded (``/snapwake/snapshot-pins/...``, scheduler-only, nodes read), and nodes hand
the blobstore the pinned digest (``services.nodeagent.integrity.attach_digest``); a record whose
digest moved off its pin is not attached and is rebuilt.

What a compromised node can still do (residual): write any snapshot record's holders, state and
corrupt mark (wasted peer fetches, forced rebuilds: availability, not integrity; closing that
needs holders recorded per node, ``/snapwake/snapshots/.../holders/{node}``, a change of the
checkpoint path); a snapshot without a pin (built before pins, or whose building leader died
before pinning: its successor pins the record as it stands) is trusted on first read, and so is
a record overwritten (still naming the builder) in the moment between the builder's write and
the scheduler's read of it (the build's answer does not carry the digest). Of the
instances the scheduler did ask it for, it can report any state and endpoint (requests for them
go where it says). It cannot write another node's node or
instance records, functions, cordons, intents, snapshot pins or the leader key, nor read or
write anything else.

``python -m snapwake.etcdauth --etcd host:port --etcd-ca ca.crt --etcd-cert admin.crt
--etcd-key admin.key --users scheduler/scheduler,nodeagent/node-0`` creates the roles, the
users (without passwords: certificates only) and the grants, grants the root role to the
caller's own common name and to ``root``, and enables auth; run again (with a new node's user,
say) it changes only what differs, revoking permissions and roles the named users should no
longer have (users it is not given are left as they are: remove a node's with etcdctl).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from snapwake import keys
from snapwake.config import ConfigError, EtcdTlsConfig, load, parse_endpoints
from snapwake.errors import SnapwakeError
from snapwake.etcd import EtcdAuthApi, EtcdTls, KeyPermission
from snapwake.pki import Identity, create_ca, issue

__all__ = ["ROLE_PERMISSIONS", "EtcdAuthConfig", "Permission", "Report", "bootstrap", "main", "node_role", "roles_of",
           "user_name", "write_identity_dirs"]

ROOT = "root"


@dataclass(frozen=True)
class Permission:
    """Read (and with ``write``, write) on ``key``, or on every key under it with ``prefix``."""

    key: str
    prefix: bool = True
    write: bool = False

    def key_permission(self) -> KeyPermission:
        raw = self.key.encode()
        return KeyPermission(raw, raw[:-1] + bytes([raw[-1] + 1]) if self.prefix else b"", self.write)


def _rw(key: str, prefix: bool = True) -> Permission:
    return Permission(key, prefix, write=True)


ROLE_PERMISSIONS: dict[str, tuple[Permission, ...]] = {
    # keys.LEADER as a prefix: the election watches it with a prefix watch.
    # keys.ACCESS: admin tokens, API keys and tenant quotas (the admin API's, services/scheduler/access.py).
    # keys.INTENTS: what it asked each node to start; no node may read or write them.
    "scheduler": (_rw(keys.FUNCTIONS), _rw(keys.SNAPSHOTS), _rw(keys.CORDONS), _rw(keys.LEADER), _rw(keys.ACCESS),
                  _rw(keys.INTENTS), _rw(keys.SNAPSHOT_PINS), Permission(keys.NODES), Permission(keys.INSTANCES)),
    # Its own node record and instance records: the per-node role (_permissions).
    # keys.SNAPSHOT_PINS: the digests the scheduler pinned, the only ones a node attaches.
    "nodeagent": (Permission(keys.FUNCTIONS), Permission(keys.NODES), _rw(keys.SNAPSHOTS),
                  Permission(keys.SNAPSHOT_PINS)),
}


def node_role(node: str) -> str:
    return f"nodeagent/{node}"


def user_name(identity: Identity) -> str:
    """The etcd user of a certificate: its common name."""
    return str(identity)


def roles_of(identity: Identity) -> tuple[str, ...]:
    """The etcd roles of an identity's user; ValueError for a service that has no etcd access."""
    if identity.role == "scheduler":
        return ("scheduler",)
    if identity.role == "nodeagent":
        return ("nodeagent", node_role(identity.name))
    if identity.role == "admin":
        return (ROOT,)
    raise ValueError(f"{identity}: a {identity.role} never talks to etcd and gets no etcd user")


def _permissions(role: str) -> tuple[Permission, ...]:
    if role.startswith("nodeagent/"):
        node = role.removeprefix("nodeagent/")
        return (_rw(keys.node_key(node), prefix=False), _rw(keys.instance_prefix(node)))
    return ROLE_PERMISSIONS[role]


def _common_name(cert_path: str) -> str:
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"{cert_path}: the certificate has no common name, so no etcd user")
    return str(names[0].value)


@dataclass
class Report:
    """What one bootstrap run changed (empty lists: everything was in place)."""

    created: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)


def bootstrap(endpoints: str, tls: EtcdTls, users: Sequence[Identity], timeout: float = 10.0) -> Report:
    """Makes etcd's users, roles and grants those of ``users`` (plus root and the caller's own
    certificate as root), then enables auth. Idempotent; revokes what is no longer wanted.
    Errors are ``snapwake.errors`` (Unavailable while etcd does not answer)."""
    caller = _common_name(tls.cert)
    wanted: dict[str, tuple[str, ...]] = {ROOT: (ROOT,), caller: (ROOT,)}
    for identity in users:
        wanted[user_name(identity)] = roles_of(identity)
    report = Report()
    with EtcdAuthApi(endpoints, tls, timeout) as api:
        for role in sorted({r for rs in wanted.values() for r in rs}):
            if api.add_role(role):
                report.created.append(f"role {role}")
            if role == ROOT:
                continue
            want = [p.key_permission() for p in _permissions(role)]
            for perm in api.permissions(role):
                if perm not in want:
                    api.revoke(role, perm)
                    report.revoked.append(f"{role}: {perm.key.decode()}")
            have = api.permissions(role)
            for perm in want:
                if perm not in have:
                    api.grant(role, perm)
                    report.granted.append(f"{role}: {perm.key.decode()}{'*' if perm.range_end else ''}")
        for user, user_roles in wanted.items():
            if api.add_user(user):
                report.created.append(f"user {user}")
            have_roles = set(api.roles(user))
            for role in sorted(have_roles - set(user_roles)):
                api.revoke_role(user, role)
                report.revoked.append(f"{user}: role {role}")
            for role in user_roles:
                if role not in have_roles:
                    api.grant_role(user, role)
                    report.granted.append(f"{user}: role {role}")
        api.enable()  # a no-op when it is on
    return report


def write_identity_dirs(pki: Path | str, identities: Sequence[str], hosts: Sequence[str] = ()) -> list[Path]:
    """Development certificates for a compose cluster: the CA in ``pki`` (created if absent)
    and, per ``role/name``, ``pki/<role>-<name>/`` holding ``ca.crt``, ``tls.crt`` and ``tls.key``
    (the key names of a Kubernetes TLS Secret), each folder mounted into that process alone.
    ``hosts`` go into every certificate (an etcd member's names). Existing folders are kept."""
    pki = Path(pki)
    ca = create_ca(pki)
    out = []
    for text in identities:
        identity = _identity(text)
        folder = pki / f"{identity.role}-{identity.name}"
        if not (folder / "tls.key").exists():
            files = issue(ca, folder, identity, hosts=hosts)
            shutil.copyfile(ca.cert_path, folder / "ca.crt")
            files.cert.rename(folder / "tls.crt")
            files.key.rename(folder / "tls.key")
        out.append(folder)
    return out


@dataclass(frozen=True)
class EtcdAuthConfig(EtcdTlsConfig):
    """Creates etcd's users, roles and grants for Snapwake's services and enables auth (idempotent).
    The etcd certificate given is an operator's (``admin/...``): it becomes a root user."""

    etcd: str = field(default="127.0.0.1:2379", metadata={"help": "etcd members' client addresses, host:port[,...]"})
    users: tuple[str, ...] = field(default=(), metadata={
        "help": "service identities role/name, comma-separated (scheduler/scheduler,nodeagent/node-0,...)"})

    def validate(self) -> list[str]:
        problems = [p for p in self.etcd_tls_problems() if not p.startswith("etcd_plaintext")]
        if self.etcd_plaintext:
            problems.append("etcd_plaintext: auth needs TLS client certificates")
        try:
            parse_endpoints(self.etcd)
        except ValueError as exc:
            problems.append(f"etcd: {exc}")
        for user in self.users:
            try:
                roles_of(_identity(user))
            except ValueError as exc:
                problems.append(f"users: {exc}")
        return problems


def _identity(text: str) -> Identity:
    role, sep, name = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r}: expected role/name")
    return Identity(role, name)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load(EtcdAuthConfig, argv, prog="python -m snapwake.etcdauth")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    tls = EtcdTls.from_config(cfg)
    assert tls is not None  # validate refuses plaintext
    try:
        report = bootstrap(cfg.etcd, tls, [_identity(u) for u in cfg.users])
    except (SnapwakeError, ValueError) as exc:
        print(f"etcdauth: {exc}", file=sys.stderr)
        return 1
    for what, items in (("created", report.created), ("granted", report.granted), ("revoked", report.revoked)):
        for item in items:
            print(f"{what} {item}")
    print("etcd auth enabled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
