"""Lease accounting (pure): who holds a slot of which instance, until when.

This is soft state of the leader: a lease lives only as long as one proxied request, so it is
not written to etcd. A new leader starts with no leases; gateways' in-flight requests finish
and their releases are ignored (unknown lease ids are a no-op). Each lease carries a TTL so a
dead gateway's leases expire and its slots come back.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Lease", "LeaseTable"]


@dataclass(frozen=True)
class Lease:
    lease_id: str
    instance_id: str
    function_id: str
    gateway_id: str
    expires_at: float


class LeaseTable:
    """Counts leases per instance and never grants past an instance's concurrency."""

    def __init__(self, clock: Callable[[], float], ttl_s: float) -> None:
        self.clock, self.ttl_s = clock, ttl_s
        self._leases: dict[str, Lease] = {}
        self._seq = itertools.count(1)
        self._tag = secrets.token_hex(4)
        # Instances being stopped: never leased again, so a stop decided while the instance
        # had no lease cannot race a new lease and cut a request off mid-stream.
        self._retired: set[str] = set()

    def retire(self, instance_id: str) -> bool:
        """Stops new leases on ``instance_id``; False if it has a lease out (keep it)."""
        if self.in_use(instance_id):
            return False
        self._retired.add(instance_id)
        return True

    def unretire(self, instance_id: str) -> None:
        """Lets ``instance_id`` be leased again (it was parked as a standby, not stopped)."""
        self._retired.discard(instance_id)

    def in_use(self, instance_id: str) -> int:
        return sum(1 for lease in self._leases.values() if lease.instance_id == instance_id)

    def free(self, instance_id: str, concurrency: int) -> int:
        return max(0, concurrency - self.in_use(instance_id))

    def try_grant(self, instance_id: str, function_id: str, gateway_id: str, concurrency: int) -> Lease | None:
        """A lease on ``instance_id`` if it has a free slot, else None."""
        self.expire()
        if instance_id in self._retired or self.in_use(instance_id) >= concurrency:
            return None
        lease = Lease(f"l-{self._tag}-{next(self._seq)}", instance_id, function_id, gateway_id,
                      self.clock() + self.ttl_s)
        self._leases[lease.lease_id] = lease
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """Removes a lease; unknown or expired ids return None (a release after failover)."""
        return self._leases.pop(lease_id, None)

    def expire(self) -> list[Lease]:
        now = self.clock()
        gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in gone:
            del self._leases[lease.lease_id]
        return gone

    def drop_instance(self, instance_id: str) -> list[Lease]:
        """Forgets every lease on an instance that ended."""
        gone = [lease for lease in self._leases.values() if lease.instance_id == instance_id]
        for lease in gone:
            del self._leases[lease.lease_id]
        return gone

    def busy_instances(self) -> frozenset[str]:
        return frozenset(lease.instance_id for lease in self._leases.values())

    def clear(self) -> None:
        self._leases.clear()

    def __len__(self) -> int:
        return len(self._leases)
