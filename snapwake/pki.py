"""Service identities: a development CA, per-service certificates, and reading a peer's identity.

Every service and node has an X.509 certificate whose identity is a SPIFFE-style URI SAN,
``spiffe://snapwake/<role>/<name>`` (``spiffe://snapwake/nodeagent/node-1``), signed by one CA.
``make run`` and the compose cluster create a development CA and the certificates with
``create_ca``/``issue`` (``cryptography``; ECDSA P-256); production mounts its own files (or
Kubernetes Secrets) at the same paths. A peer's identity comes from the certificate it presented
(``identity_from_pem``), never from anything it says in a request.

    ca = create_ca(Path("var/pki"))
    files = issue(ca, Path("var/pki"), Identity("nodeagent", "node-1"), hosts=["10.0.0.5", "node-1"])
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ROLES", "CertificateAuthority", "Identity", "TlsFiles", "create_ca", "identity_from_pem", "issue",
           "issue_dir", "main", "parse_identity", "server_name"]

TRUST_DOMAIN = "snapwake"
# Who may hold a certificate. ``admin`` is an operator's client certificate (optional: admin
# callers normally use a bearer token over server-authenticated TLS).
ROLES = ("gateway", "scheduler", "nodeagent", "blobstore", "etcd", "admin")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_URI = re.compile(rf"^spiffe://{TRUST_DOMAIN}/(?P<role>[a-z]+)/(?P<name>[a-z0-9.-]+)$")
CA_DAYS = 3650
LEAF_DAYS = 365


def server_name(role: str) -> str:
    """The DNS name every certificate of ``role`` carries: clients check a server's role by it
    (``grpc.ssl_target_name_override``), since node and pod addresses change."""
    return f"{role}.{TRUST_DOMAIN}.internal"


@dataclass(frozen=True)
class Identity:
    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"identity role {self.role!r}: must be one of {', '.join(ROLES)}")
        if not _NAME.match(self.name):
            raise ValueError(f"identity name {self.name!r}: lowercase letters, digits, '.' and '-', at most 63")

    @property
    def uri(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one identity: the CA bundle it trusts, its certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class CertificateAuthority:
    cert_path: Path
    key_path: Path

    def load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path}: not an EC private key")
        return cert, key


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(directory: Path, common_name: str = "Snapwake development CA") -> CertificateAuthority:
    """The CA in ``directory`` (``ca.crt``, ``ca.key`` 0600), created if it is not there yet."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(directory / "ca.crt", directory / "ca.key")
    if ca.cert_path.exists() and ca.key_path.exists():
        return ca
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(ca.key_path, _key_pem(key))
    ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(ca: CertificateAuthority, directory: Path, identity: Identity, hosts: Sequence[str] = (),
          days: int = LEAF_DAYS) -> TlsFiles:
    """Writes ``<role>-<name>.crt``/``.key`` for ``identity`` in ``directory``, valid as a server
    for ``hosts`` (DNS names or IPs; ``<role>.snapwake.internal``, ``localhost`` and ``127.0.0.1``
    always) and as a client."""
    ca_cert, ca_key = ca.load()
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*hosts, server_name(identity.role), "localhost", "127.0.0.1", "::1"]))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity)),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri),
                                                        *(_san(h) for h in names)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{identity.role}-{identity.name}"
    files = TlsFiles(ca.cert_path, directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_private(files.key, _key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def identity_from_pem(pem: bytes) -> Identity | None:
    """The identity a (chain-verified) peer certificate carries, or None if it carries none.

    Exactly one ``spiffe://snapwake/...`` URI SAN is accepted; two are ambiguous and count as none.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = [m for uri in sans.get_values_for_type(x509.UniformResourceIdentifier) if (m := _URI.match(uri))]
    if len(found) != 1:
        return None
    try:
        return Identity(found[0]["role"], found[0]["name"])
    except ValueError:
        return None


def issue_dir(ca: CertificateAuthority, directory: Path, identity: Identity, hosts: Sequence[str] = ()) -> TlsFiles:
    """``issue`` into ``directory`` as ``ca.crt``, ``tls.crt`` and ``tls.key``: the layout a
    service's ``tls_dir`` (and a Kubernetes TLS Secret) has."""
    files = issue(ca, directory, identity, hosts)
    out = TlsFiles(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    files.cert.replace(out.cert)
    files.key.replace(out.key)
    if ca.cert_path.resolve() != out.ca.resolve():
        out.ca.write_bytes(ca.cert_path.read_bytes())
    return out


def parse_identity(text: str) -> Identity:
    """``role/name`` as an Identity; raises ValueError naming the problem."""
    role, sep, name = text.partition("/")
    if not sep:
        raise ValueError(f"identity {text!r}: expected role/name (nodeagent/node-1)")
    return Identity(role, name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m snapwake.pki DIR ROLE/NAME[=HOST,HOST...] ...``: the CA in DIR (created once)
    and, for each identity, ``DIR/<role>-<name>/{ca.crt,tls.crt,tls.key}`` (kept if present)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m snapwake.pki", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="where the CA and the identities' folders go")
    parser.add_argument("identities", nargs="*", metavar="ROLE/NAME[=HOSTS]",
                        help="an identity, and the comma-separated hosts its server certificate is valid for")
    parser.add_argument("--force", action="store_true", help="reissue certificates that exist")
    opts = parser.parse_args(argv)
    try:
        wanted = []
        for item in opts.identities:
            ident, _, hosts = item.partition("=")
            wanted.append((parse_identity(ident), [h for h in hosts.split(",") if h]))
    except ValueError as exc:
        print(f"snapwake.pki: {exc}", file=sys.stderr)
        return 2
    ca = create_ca(opts.dir)
    for identity, hosts in wanted:
        folder = opts.dir / f"{identity.role}-{identity.name}"
        if opts.force or not (folder / "tls.crt").exists():
            issue_dir(ca, folder, identity, hosts)
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
