"""Who calls the admin API, and what they may touch: bearer tokens and tenant scoping.

A caller presents ``authorization: Bearer swt-<id>-<secret>`` in the gRPC metadata (the same
over plain gRPC and over server-authenticated TLS: this module reads metadata only). The
token's record is read from etcd by its id on every call (``/snapwake/access/tokens/{id}``),
so every replica sees a new token at once and a revoked one is refused on the next call, and
its SHA-256 is compared in constant time (why SHA-256 and not a keyed hash:
``snapwake.credentials``).

Auth is on when the scheduler's ``admin_auth`` is set (the dev cluster and compose set it);
off, every caller is ``OPEN`` (an operator without a token id), as before tokens existed, so
single-process tests need no token. A missing, malformed, unknown or revoked token is
UNAUTHENTICATED.

Scoping. A tenant token reaches only resources whose function id starts with its tenant. Ids
that carry the tenant (functions, snapshots) are refused from the id alone, before anything is
read, so the answer (PERMISSION_DENIED) is the same whether the resource exists or not. An
instance id carries no tenant: an unknown instance and another tenant's instance get the same
PERMISSION_DENIED and message, so existence does not leak either. PERMISSION_DENIED rather than
NOT_FOUND because the caller is told plainly that the token is the problem, and because it is
what the authorization matrix expects of another tenant's token. Lists are filtered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from snapwake import credentials, errors, keys
from snapwake.etcd import EtcdClient
from snapwake.v1.scheduler_pb2 import AdminToken

__all__ = ["OPEN", "Authenticator", "Caller"]

_MAX_HEADER = 512


@dataclass(frozen=True)
class Caller:
    """An authenticated admin caller."""

    token_id: str  # "" when auth is off
    tenant: str  # "" for an operator
    operator: bool

    def who(self) -> dict[str, object]:
        """For audit lines: the token's id and owner, never the token."""
        return {"token_id": self.token_id or None, "tenant": self.tenant or None, "operator": self.operator}

    def require_operator(self, what: str) -> None:
        if not self.operator:
            raise errors.PermissionDenied(f"{what} needs an operator token; token {self.token_id} belongs to "
                                          f"tenant {self.tenant}")

    def may(self, tenant: str) -> bool:
        return self.operator or tenant == self.tenant

    def require_tenant(self, tenant: str, what: str) -> None:
        """PermissionDenied unless the caller may touch ``tenant``'s ``what``."""
        if not self.may(tenant):
            raise errors.PermissionDenied(f"{what}: token {self.token_id} may only reach tenant {self.tenant}'s "
                                          "resources")

    def require_function(self, function_id: str, what: str) -> None:
        self.require_tenant(function_id.partition("/")[0], what)


OPEN = Caller("", "", operator=True)


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer`` entry; Unauthenticated otherwise."""
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        raise errors.Unauthenticated("no credentials: send the metadata 'authorization: Bearer <admin token>'")
    if len(values) > 1:
        raise errors.Unauthenticated("authorization: give one bearer token, not several")
    value = values[0] if isinstance(values[0], str) else values[0].decode("ascii", "replace")
    scheme, _, token = value[:_MAX_HEADER].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("authorization: expected 'Bearer <admin token>'")
    return token.strip()


class Authenticator:
    """Turns a call's metadata into a ``Caller``."""

    def __init__(self, etcd: EtcdClient, enabled: bool) -> None:
        self.etcd, self.enabled = etcd, enabled

    async def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        if not self.enabled:
            return OPEN
        cred = credentials.parse(bearer(metadata), credentials.TOKEN_PREFIX)
        if cred is None:
            raise errors.Unauthenticated("authorization: not an admin token (expected swt-<id>-<secret>)")
        entry = await self.etcd.get(keys.admin_token_key(cred.id), AdminToken)
        record: AdminToken | None = entry.value if entry is not None else None  # type: ignore[assignment]
        # The digest is computed whether or not the id is known, so timing tells nothing more.
        digest = credentials.sha256_digest(cred.text)
        if record is None or not credentials.matches(record.sha256, digest):
            raise errors.Unauthenticated(f"token {cred.id} is unknown or revoked")
        return Caller(record.id, record.tenant, record.operator)
