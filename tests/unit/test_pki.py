"""snapwake.pki: the development CA, issued certificates and the identity read back from one."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from snapwake.pki import Identity, create_ca, identity_from_pem, issue


def test_an_issued_certificate_chains_to_the_ca_and_carries_its_identity(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    files = issue(ca, tmp_path, Identity("nodeagent", "node-1"), hosts=["10.0.0.5", "node-1.local"])
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_path.read_bytes()))
    assert identity_from_pem(files.cert.read_bytes()) == Identity("nodeagent", "node-1")
    # The standard library accepts the pair as a server certificate for the hosts it names.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert_path))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node-1.local" in sans.get_values_for_type(x509.DNSName)
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} >= {"10.0.0.5", "127.0.0.1"}


def test_the_ca_is_kept_once_created(tmp_path: Path) -> None:
    first = create_ca(tmp_path).cert_path.read_bytes()
    assert create_ca(tmp_path).cert_path.read_bytes() == first


@pytest.mark.parametrize(("role", "name"), [("root", "x"), ("gateway", "Upper"), ("gateway", "a/b"), ("gateway", "")])
def test_bad_identities_are_refused_naming_the_part(role: str, name: str) -> None:
    with pytest.raises(ValueError, match="role|name"):
        Identity(role, name)


def test_a_certificate_without_an_identity_has_none(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    assert identity_from_pem(ca.cert_path.read_bytes()) is None
    assert identity_from_pem(b"not a certificate") is None
