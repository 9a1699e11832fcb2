"""Bearer credentials with a public id: admin tokens (``swt-<id>-<secret>``) and gateway API
keys (``sk-sw-<id>-<secret>``), their digests at rest, and the secret file that keys the API-key
digests. Pure; the scheduler creates both, the gateway checks API keys, the CLI reads tokens.

The id (12 hex digits) is public: lists, audit lines and rate limits name a credential by it,
and a lookup finds the one stored record by it instead of hashing against every record. The
secret is 32 random bytes (256 bits), so no stored digest can be searched back to a credential:

- admin tokens are stored as plain SHA-256. The scheduler then needs no secret of its own to
  check them (every replica, and a fresh cluster's bootstrap, can), and a leaked etcd dump
  still gives nobody a token;
- API keys are stored as HMAC-SHA256 under a server secret (``api_key_secret_file``, shared by
  the scheduler, which creates keys, and the gateways, which check them). A dump of etcd
  without that file cannot even confirm a guessed key. Both are one hash per check, never a
  slow password hash on every request: for 256-bit secrets stretching adds nothing.

Digests are compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import NamedTuple

__all__ = ["API_KEY_PREFIX", "TOKEN_PREFIX", "Credential", "hmac_digest", "load_secret", "matches",
           "new_credential", "parse", "sha256_digest"]

TOKEN_PREFIX = "swt-"
API_KEY_PREFIX = "sk-sw-"
_ID = re.compile(r"[0-9a-f]{12}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_MIN_SECRET_FILE_BYTES = 32


class Credential(NamedTuple):
    """A parsed credential: its public id and the whole string (what the digest covers)."""

    id: str
    text: str


def new_credential(prefix: str) -> Credential:
    """A fresh credential ``<prefix><id>-<secret>``."""
    cid = secrets.token_hex(6)
    return Credential(cid, f"{prefix}{cid}-{secrets.token_urlsafe(32)}")


def parse(text: str, prefix: str) -> Credential | None:
    """The credential in ``text``, or None when it is not one of this kind (never raises: the
    text comes from anyone)."""
    if not text.startswith(prefix):
        return None
    cid, sep, secret = text[len(prefix):].partition("-")
    if not sep or not _ID.fullmatch(cid) or not _SECRET.fullmatch(secret):
        return None
    return Credential(cid, text)


def sha256_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hmac_digest(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def matches(stored_hex: str, computed_hex: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(stored_hex.encode(), computed_hex.encode())


def load_secret(path: str | Path, what: str = "api_key_secret_file") -> bytes:
    """The server secret in ``path`` (surrounding whitespace dropped); ``ValueError`` naming
    ``what`` when it is missing or shorter than 32 bytes."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if len(data) < _MIN_SECRET_FILE_BYTES:
        raise ValueError(f"{what}: {path} holds {len(data)} bytes; at least {_MIN_SECRET_FILE_BYTES} are needed")
    return data
