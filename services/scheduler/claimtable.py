"""Claim accounting (pure): who holds a slot of which instance, until when.

This is soft state of the leader: a claim lives only as long as one proxied request, so it is
not written to etcd. A new leader starts with no claims and learns the ones still held from the
gateways' periodic reports: ``adopt`` counts a reported claim it does not know, unless it was
released or expired here (ids are remembered, boundedly, so a report that raced its release
cannot bring it back). Each claim carries a TTL of a few of the gateways' report periods,
restarted by every report that lists it, so the claims of a gateway that stops reporting expire
within seconds and their slots come back; a claim its gateway reported once and then leaves
out of a report was released by it (the ReleaseClaim was lost) and goes at once.

A claim belongs to the gateway it was granted to (``Claim.gateway_id``, which the servicer
derives from the caller's certificate where there is one): only that gateway refreshes,
adopts or releases it, and released ids are remembered per gateway, so a gateway cannot keep
another's claim alive, release it, or stop a new leader from adopting it.
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

__all__ = ["Adoption", "Claim", "ClaimTable"]

# Released ids remembered against late reports; a report races its release by one RPC at most.
_REMEMBER_RELEASED = 65536


@dataclass(frozen=True)
class Claim:
    claim_id: str
    instance_id: str
    function_id: str
    gateway_id: str
    expires_at: float
    reported: bool = False  # its gateway listed it in a report: leaving it out later releases it


class Adoption(enum.Enum):
    """What ``ClaimTable.adopt`` did with one claim a gateway reports holding."""

    ADOPTED = "adopted"  # unknown here (an earlier leader granted it): counted from now on
    REFRESHED = "refreshed"  # already counted: its TTL starts again
    RELEASED = "released"  # released or expired here: a stale report, never brought back
    RETIRED = "retired"  # its instance is being stopped: not counted
    FOREIGN = "foreign"  # another gateway holds it: left alone (the servicer refuses the report)


class ClaimTable:
    """Counts claims per instance and never grants past an instance's concurrency."""

    def __init__(self, clock: Callable[[], float], ttl_s: float) -> None:
        self.clock, self.ttl_s = clock, ttl_s
        self._claims: dict[str, Claim] = {}
        self._seq = itertools.count(1)
        self._tag = secrets.token_hex(4)
        # Instances being stopped: never claimed again, so a stop decided while the instance
        # had no claim cannot race a new claim and cut a request off mid-stream.
        self._retired: set[str] = set()
        # (gateway_id, claim_id), insertion-ordered: the oldest is forgotten first
        self._released: dict[tuple[str, str], None] = {}

    def retire(self, instance_id: str) -> bool:
        """Stops new claims on ``instance_id``; False if it has a claim out (keep it)."""
        if self.in_use(instance_id):
            return False
        self._retired.add(instance_id)
        return True

    def unretire(self, instance_id: str) -> None:
        """Lets ``instance_id`` be claimed again (it was parked as a standby, not stopped)."""
        self._retired.discard(instance_id)

    def in_use(self, instance_id: str) -> int:
        return sum(1 for claim in self._claims.values() if claim.instance_id == instance_id)

    def free(self, instance_id: str, concurrency: int) -> int:
        return max(0, concurrency - self.in_use(instance_id))

    def try_grant(self, instance_id: str, function_id: str, gateway_id: str, concurrency: int) -> Claim | None:
        """A claim on ``instance_id`` if it has a free slot, else None."""
        self.expire()
        if instance_id in self._retired or self.in_use(instance_id) >= concurrency:
            return None
        claim = Claim(f"c-{self._tag}-{next(self._seq)}", instance_id, function_id, gateway_id,
                      self.clock() + self.ttl_s)
        self._claims[claim.claim_id] = claim
        return claim

    def get(self, claim_id: str) -> Claim | None:
        """The live claim ``claim_id``, or None (released, expired or never granted here)."""
        return self._claims.get(claim_id)

    def was_released(self, gateway_id: str, claim_id: str) -> bool:
        """True if ``gateway_id`` held ``claim_id`` here (or released it) and it is gone."""
        return (gateway_id, claim_id) in self._released

    def release(self, claim_id: str, gateway_id: str) -> Claim | None:
        """Removes ``gateway_id``'s claim; unknown or expired ids return None (a release after
        failover). Either way the id is remembered for this gateway, so its later report cannot
        adopt it. Another gateway's claim is left alone (None): the caller checks ``get`` first."""
        self._remember(gateway_id, claim_id)
        known = self._claims.get(claim_id)
        if known is None or known.gateway_id != gateway_id:
            return None
        return self._claims.pop(claim_id)

    def adopt(self, claim_id: str, instance_id: str, function_id: str, gateway_id: str) -> Adoption:
        """Counts a claim ``gateway_id`` reports holding, even past concurrency (its request is
        in flight whatever this table says; ``free`` is then 0 until enough are released)."""
        self.expire()
        known = self._claims.get(claim_id)
        if known is not None and known.gateway_id != gateway_id:
            return Adoption.FOREIGN
        if known is not None:
            self._claims[claim_id] = replace(known, expires_at=self.clock() + self.ttl_s, reported=True)
            return Adoption.REFRESHED
        if (gateway_id, claim_id) in self._released:
            return Adoption.RELEASED
        if instance_id in self._retired:
            return Adoption.RETIRED
        self._claims[claim_id] = Claim(claim_id, instance_id, function_id, gateway_id,
                                       self.clock() + self.ttl_s, reported=True)
        return Adoption.ADOPTED

    def drop_unreported(self, gateway_id: str, held: Collection[str]) -> list[Claim]:
        """Releases ``gateway_id``'s claims that an earlier report listed and ``held`` (its
        latest report) does not. A gateway reports one at a time, so such a claim was released."""
        return self._drop(lambda claim: claim.reported and claim.gateway_id == gateway_id
                          and claim.claim_id not in held)

    def expire(self) -> list[Claim]:
        now = self.clock()
        return self._drop(lambda claim: claim.expires_at <= now)

    def drop_instance(self, instance_id: str) -> list[Claim]:
        """Forgets every claim on an instance that ended."""
        return self._drop(lambda claim: claim.instance_id == instance_id)

    def _drop(self, which: Callable[[Claim], bool]) -> list[Claim]:
        gone = [claim for claim in self._claims.values() if which(claim)]
        for claim in gone:
            del self._claims[claim.claim_id]
            self._remember(claim.gateway_id, claim.claim_id)
        return gone

    def _remember(self, gateway_id: str, claim_id: str) -> None:
        self._released[(gateway_id, claim_id)] = None
        if len(self._released) > _REMEMBER_RELEASED:
            del self._released[next(iter(self._released))]

    def next_expiry(self, function_id: str) -> float | None:
        """When the first of ``function_id``'s claims expires (a waiter for it looks again then)."""
        return min((c.expires_at for c in self._claims.values() if c.function_id == function_id), default=None)

    def busy_instances(self) -> frozenset[str]:
        return frozenset(claim.instance_id for claim in self._claims.values())

    def clear(self) -> None:
        """Forgets every claim (a new term); released ids stay remembered, they stay dead."""
        self._claims.clear()

    def __len__(self) -> int:
        return len(self._claims)
