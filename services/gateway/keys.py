"""API keys at rest: only a digest of each key is kept, and keys are compared in constant time.

Two sources of keys, checked in this order:

- keys made through the scheduler's admin API (``snapwake apikey create TENANT``), of the form
  ``sk-sw-<id>-<secret>`` (``snapwake.credentials``). The scheduler keeps each as
  HMAC-SHA256 under the server secret in etcd; the gateway holds that secret too
  (``api_key_secret_file``) and an ``ApiKeyTable`` of id -> (tenant, digest), which
  ``refresh_forever`` replaces from the scheduler's ``ClaimService.SyncApiKeys`` every
  ``api_key_refresh`` seconds. A key created or revoked is therefore honoured by every gateway
  within ``api_key_refresh`` plus one scheduler call (2 s by default), without a restart.
  While the scheduler cannot be reached the last table stays in force (requests need the
  scheduler for their claims anyway). A presented key is found by its id, then its HMAC is
  compared with ``hmac.compare_digest``: one hash per request.
- keys written into the config (below), kept for existing deployments and tests.

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

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

from snapwake import credentials

__all__ = ["HASH_PREFIX", "ApiKeyTable", "KeyStore", "refresh_forever", "Principal", "hash_entry", "hash_key", "new_key"]

log = logging.getLogger(__name__)
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


class ApiKeyTable:
    """The admin API's keys: id -> (tenant, HMAC-SHA256 hex under ``secret``), replaced whole."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._keys: dict[str, tuple[str, str]] = {}
        self.refreshed_at = 0.0  # monotonic time of the last replace

    def replace(self, records: Iterable[tuple[str, str, str]]) -> None:
        """``(id, tenant, hmac hex)`` of every live key."""
        self._keys = {kid: (tenant, digest) for kid, tenant, digest in records}
        self.refreshed_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, key: str) -> Principal | None:
        cred = credentials.parse(key, credentials.API_KEY_PREFIX)
        if cred is None:
            return None
        tenant, stored = self._keys.get(cred.id, ("", ""))
        # Hashed and compared even for an unknown id, so the time taken says no more than the id.
        ok = credentials.matches(stored or "0" * 64, credentials.hmac_digest(self._secret, cred.text))
        return Principal(tenant, cred.id) if ok and stored else None


async def refresh_forever(table: ApiKeyTable, fetch: Callable[[], Awaitable[Iterable[tuple[str, str, str]]]],
                          interval_s: float) -> None:
    """Replaces ``table`` from ``fetch()`` every ``interval_s``; a failed fetch keeps the last table."""
    failing = False
    while True:
        try:
            table.replace(await fetch())
            if failing:
                log.info("API keys refreshed again (%d keys)", len(table))
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep the last table; say so once
            if not failing:
                log.warning("API key refresh failed (%s); the last %d keys stay in force", exc, len(table))
            failing = True
        await asyncio.sleep(interval_s)


class KeyStore:
    """The digests of the configured keys and the tenant of each, plus the admin API's keys
    (``table``) when the gateway has the API-key secret."""

    def __init__(self, entries: Iterable[_Entry] = (), table: ApiKeyTable | None = None) -> None:
        self._entries = tuple(entries)
        self.table = table

    def with_table(self, table: ApiKeyTable | None) -> KeyStore:
        return KeyStore(self._entries, table)

    @classmethod
    def parse(cls, entries: Iterable[str], what: str = "api_keys") -> KeyStore:
        """From config entries; ``ValueError`` naming the first bad one by position."""
        return cls(_parse(entry, n, what) for n, entry in enumerate(entries, 1))

    def __bool__(self) -> bool:
        """Whether auth is on: keys are configured, or the admin API's keys are taken."""
        return bool(self._entries) or self.table is not None

    @property
    def plaintext(self) -> int:
        """How many entries gave the key itself (development only)."""
        return sum(e.plaintext for e in self._entries)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(e.principal.tenant for e in self._entries)

    def lookup(self, key: str) -> Principal | None:
        """The owner of ``key``, or None; compares with every digest in constant time."""
        if self.table is not None and key.startswith(credentials.API_KEY_PREFIX):
            return self.table.lookup(key)
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
