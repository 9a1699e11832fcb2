"""API keys at rest: only a SHA-256 digest of each key is kept, and keys are compared in constant time.

A Snapwake key is 32 random bytes (``sk-`` + 43 url-safe characters, ``new_key``). For a key of
that entropy a plain SHA-256 digest is what the best-run services store: nobody can search a
256-bit space, so a slow or salted hash (scrypt, argon2) would only cost CPU on every request
without making a leaked digest any less useless. A leaked config holding digests gives no key.

Config entries (``api_keys``, ``operator_keys``) take two forms:

- ``sha256:<64 hex digits>:tenant``: the digest of the key (``python -m services.gateway.keys``
  prints a new key with its entry); this is the form for any deployment;
- ``key:tenant``: the key itself, still accepted for development and tests. It is hashed when
  the config is read and never kept; the gateway logs a warning naming how many there are.
  Refusing them would break every dev setup for no gain on a laptop; the warning and the README
  say production configs must use digests.

``KeyStore.lookup`` hashes the presented key and compares it with every stored digest through
``hmac.compare_digest``, without stopping at a match, so neither which entry matched nor how
much of a digest did shows in the time taken.

    python -m services.gateway.keys new TENANT   # a new key, and its config entry
    python -m services.gateway.keys hash TENANT  # the entry for a key read from stdin
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["HASH_PREFIX", "KeyStore", "Principal", "hash_entry", "hash_key", "new_key"]

HASH_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class Principal(NamedTuple):
    """Who a key belongs to: its tenant, and a short id of the key (for limits and logs)."""

    tenant: str
    key_id: str


class _Entry(NamedTuple):
    digest: bytes
    principal: Principal
    plaintext: bool  # given as the key itself in the config


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of ``key``."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def hash_entry(key: str, tenant: str) -> str:
    """The config entry that admits ``key`` for ``tenant``."""
    return f"{hash_key(key)}:{tenant}"


def new_key() -> str:
    """A new random API key (256 bits)."""
    return "sk-" + secrets.token_urlsafe(32)


def _parse(entry: str, number: int, what: str) -> _Entry:
    """One config entry; ``ValueError`` naming its position, never its text (it may hold a key)."""
    if entry.startswith(HASH_PREFIX):
        hexdigest, sep, tenant = entry[len(HASH_PREFIX):].partition(":")
        if not sep or not tenant or not _HEX_DIGEST.fullmatch(hexdigest):
            raise ValueError(f"{what} entry #{number} must be sha256:<64 lowercase hex digits>:tenant")
        return _Entry(bytes.fromhex(hexdigest), Principal(tenant, hexdigest[:12]), plaintext=False)
    key, sep, tenant = entry.partition(":")
    if not sep or not key or not tenant:
        raise ValueError(f"{what} entry #{number} must be sha256:<hex>:tenant or key:tenant")
    digest = hashlib.sha256(key.encode()).digest()
    return _Entry(digest, Principal(tenant, digest.hex()[:12]), plaintext=True)


class KeyStore:
    """The digests of the configured keys, and the tenant of each."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries = tuple(entries)

    @classmethod
    def parse(cls, entries: Iterable[str], what: str = "api_keys") -> KeyStore:
        """From config entries; ``ValueError`` naming the first bad one by position."""
        return cls(_parse(entry, n, what) for n, entry in enumerate(entries, 1))

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def plaintext(self) -> int:
        """How many entries gave the key itself (development only)."""
        return sum(e.plaintext for e in self._entries)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(e.principal.tenant for e in self._entries)

    def lookup(self, key: str) -> Principal | None:
        """The owner of ``key``, or None; compares with every digest in constant time."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest) and found is None:
                found = entry.principal
        return found


def main(argv: list[str]) -> int:
    """The CLI in the module docstring."""
    if len(argv) != 2 or argv[0] not in ("new", "hash") or not argv[1] or ":" in argv[1]:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    command, tenant = argv
    if command == "new":
        key = new_key()
        print(f"key (give it to the tenant; it is not stored): {key}")
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print("no key on stdin", file=sys.stderr)
            return 2
    print(f"config entry (api_keys / operator_keys): {hash_entry(key, tenant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
