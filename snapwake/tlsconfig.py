"""TLS settings shared by every service's config: where its CA, certificate and key are.

Each service config inherits ``TlsSettings``. The files are read at start-up (and checked by
``validate``), so production mounts its own (a Kubernetes Secret at ``tls_dir``, with
``ca.crt``, ``tls.crt`` and ``tls.key``, the layout of cert-manager's and ``kubectl create secret
tls`` Secrets), while ``make run`` and the compose cluster write a development CA with
``python -m snapwake.pki``.

Without a certificate a service refuses to start, unless ``dev_plaintext`` is set: then it
serves without TLS and without any authorization, and says so in its log. The default is to
refuse because the failure it prevents is silent: a production deployment whose Secret was not
mounted would otherwise run with every RPC open to anyone who reaches the port.

Servers check a client's certificate against the CA and authorize by the identity in it
(``snapwake.authz``). Clients present their own certificate and check the server's against
the CA under the name ``<role>.snapwake.internal`` (``server_name``), not the address dialled:
node and pod addresses change, the role a server must have does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from snapwake.config import parse_address
from snapwake.pki import TRUST_DOMAIN, Identity, identity_from_pem, server_name

__all__ = ["TLS_FIELDS", "ClientTls", "ServerSettings", "ServerTls", "TlsSettings", "server_name"]


@dataclass(frozen=True)
class ServerTls:
    """What a server needs: the CA its clients' certificates must chain to, and its own pair."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity
    """The identity in ``cert``: the server's own (a blobstore's name is its node)."""

    def client(self) -> ClientTls:
        """The same pair, presented as a client to the services this one calls."""
        return ClientTls(self.ca, self.cert, self.key)


@dataclass(frozen=True)
class ClientTls:
    """What a client presents (``cert``/``key``; empty for server-authenticated TLS only) and the
    CA it checks the server against."""

    ca: bytes
    cert: bytes = b""
    key: bytes = b""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TlsSettings:
    """Mixin of every service config: the TLS files, or the development opt-out."""

    tls_dir: str = field(default="", metadata=_help(
        "folder with ca.crt, tls.crt and tls.key (a mounted Kubernetes Secret); tls_ca/tls_cert/tls_key override one"))
    tls_ca: str = field(default="", metadata=_help("PEM file of the CA that signs every service certificate"))
    tls_cert: str = field(default="", metadata=_help("PEM file of this service's certificate (spiffe://snapwake/<role>/<name>)"))
    tls_key: str = field(default="", metadata=_help("PEM file of this service's private key"))
    dev_plaintext: bool = field(default=False, metadata=_help(
        "development only: no TLS and no authorization at all (refused together with a certificate)"))

    def tls_paths(self) -> tuple[Path, Path, Path] | None:
        """(ca, cert, key), or None when no TLS file is configured."""
        if not (self.tls_dir or self.tls_ca or self.tls_cert or self.tls_key):
            return None
        base = Path(self.tls_dir) if self.tls_dir else None
        pick = lambda given, name: Path(given) if given else (base / name if base else Path())  # noqa: E731
        return pick(self.tls_ca, "ca.crt"), pick(self.tls_cert, "tls.crt"), pick(self.tls_key, "tls.key")

    def tls_problems(self, role: str, name: str = "") -> list[str]:
        """Every problem with the TLS keys, each naming its key; ``role`` (and ``name``, when
        given): the identity the certificate must carry."""
        paths = self.tls_paths()
        if paths is None:
            return []  # refused at start-up unless dev_plaintext (plaintext_refusal)
        if self.dev_plaintext:
            return ["dev_plaintext: set together with a certificate; choose one"]
        problems = []
        for key, path in zip(("tls_ca", "tls_cert", "tls_key"), paths, strict=True):
            if path == Path():
                problems.append(f"{key}: not set (and no tls_dir)")
            elif not path.is_file():
                problems.append(f"{key}: {path} is not a readable file")
        if problems:
            return problems
        identity = identity_from_pem(paths[1].read_bytes())
        if identity is None:
            problems.append(f"tls_cert: {paths[1]} carries no spiffe://{TRUST_DOMAIN}/<role>/<name> identity")
        elif identity.role != role or (name and identity.name != name):
            problems.append(f"tls_cert: {paths[1]} is {identity}, not {role}/{name or '<name>'}")
        return problems

    def plaintext_refusal(self) -> str | None:
        """Why this service must not start: no certificate and no ``dev_plaintext``; None if it may.

        Checked by ``snapwake.service.bootstrap`` when a service starts, not by ``validate``, so
        that code and tests building a config object for other reasons need no certificate."""
        if self.tls_paths() is None and not self.dev_plaintext:
            return ("invalid configuration: tls_dir: no certificate configured (tls_dir, or tls_ca, tls_cert and "
                    "tls_key); --dev-plaintext runs without TLS and authorization, for development only")
        return None

    def server_tls(self) -> ServerTls | None:
        """The server's TLS material, read now; None in ``dev_plaintext`` mode."""
        paths = self.tls_paths()
        if paths is None:
            return None
        ca, cert, key = (p.read_bytes() for p in paths)
        identity = identity_from_pem(cert)
        if identity is None:
            raise ValueError(f"tls_cert: {paths[1]} carries no identity")
        return ServerTls(ca, cert, key, identity)

    def client_tls(self) -> ClientTls | None:
        """The client side: this service's own pair, presented to the servers it calls."""
        tls = self.server_tls()
        return None if tls is None else ClientTls(tls.ca, tls.cert, tls.key)


@dataclass(frozen=True)
class ServerSettings(TlsSettings):
    """Mixin of the gRPC services' configs: the TLS files plus the probe port."""

    health_listen: str = field(default="", metadata=_help(
        "host:port of a plaintext port serving only grpc.health.v1, for probes (empty: none)"))

    def tls_problems(self, role: str, name: str = "") -> list[str]:
        problems = super().tls_problems(role, name)
        if self.health_listen:
            try:
                parse_address(self.health_listen)
            except ValueError as exc:
                problems.append(f"health_listen: {exc}")
        return problems


# Field names, for configs that must tell the TLS keys from their own (tests, docs).
TLS_FIELDS = tuple(f.name for f in dataclasses.fields(ServerSettings))
