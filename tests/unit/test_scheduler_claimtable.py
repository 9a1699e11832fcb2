"""Claim accounting with a fake clock: concurrency is never exceeded, TTLs expire, reported
claims are adopted once and never brought back after their release."""

from __future__ import annotations

import pytest

from services.scheduler.claims import QueueDepths
from services.scheduler.claimtable import _REMEMBER_RELEASED, Adoption, ClaimTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("concurrency", "attempts", "granted"), [(1, 5, 1), (2, 20, 2), (4, 3, 3), (4, 4, 4)])
def test_never_past_concurrency(concurrency: int, attempts: int, granted: int) -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    got = [table.try_grant("i-1", "t/d/f", "gw", concurrency) for _ in range(attempts)]
    assert sum(g is not None for g in got) == granted
    assert table.in_use("i-1") == granted
    assert len({g.claim_id for g in got if g}) == granted


def test_release_frees_a_slot_and_unknown_release_is_noop() -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    a = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert a is not None and table.try_grant("i-1", "t/d/f", "gw", 1) is None
    assert table.release(a.claim_id, "gw") == a
    assert table.release(a.claim_id, "gw") is None
    assert table.release("c-unknown", "gw") is None
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is not None


def test_ttl_expiry_returns_slots_of_a_dead_gateway() -> None:
    clock = Clock()
    table = ClaimTable(clock, ttl_s=10)
    assert table.try_grant("i-1", "t/d/f", "dead-gw", 1) is not None
    clock.now += 9.9
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is None
    clock.now += 0.2
    claim = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert claim is not None and claim.gateway_id == "gw" and len(table) == 1


def test_drop_instance_and_busy() -> None:
    table = ClaimTable(Clock(), ttl_s=10)
    table.try_grant("i-1", "t/d/f", "gw", 2)
    table.try_grant("i-2", "t/d/f", "gw", 2)
    assert table.busy_instances() == {"i-1", "i-2"}
    assert len(table.drop_instance("i-1")) == 1
    assert table.busy_instances() == {"i-2"} and table.free("i-2", 2) == 1


def test_queue_depths_sum_fresh_reports() -> None:
    clock = Clock()
    q = QueueDepths(clock, stale_s=5)
    q.report("gw1", {"t/d/f": 3})
    clock.now += 4
    q.report("gw2", {"t/d/f": 2, "t/d/g": 1})
    assert q.total("t/d/f") == 5
    clock.now += 2  # gw1's report is now stale
    assert (q.total("t/d/f"), q.total("t/d/g"), q.total("t/d/h")) == (2, 1, 0)


def test_retired_instance_gets_no_new_lease_and_busy_one_cannot_retire() -> None:
    table = ClaimTable(clock=lambda: 0.0, ttl_s=60)
    held = table.try_grant("i-busy", "t/n/f", "g", concurrency=2)
    assert held is not None
    assert table.retire("i-busy") is False
    assert table.try_grant("i-busy", "t/n/f", "g", concurrency=2) is not None
    assert table.retire("i-idle") is True
    assert table.try_grant("i-idle", "t/n/f", "g", concurrency=2) is None


# Adoption: a new leader counts the claims gateways report holding from the last term.

def test_adopted_leases_count_against_concurrency() -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    assert table.adopt("c-old-1", "i-1", "t/d/f", "gw") is Adoption.ADOPTED
    assert table.adopt("c-old-2", "i-1", "t/d/f", "gw") is Adoption.ADOPTED
    assert (table.in_use("i-1"), table.free("i-1", 2)) == (2, 0)
    assert table.try_grant("i-1", "t/d/f", "gw2", 2) is None
    assert table.release("c-old-1", "gw") is not None
    assert table.try_grant("i-1", "t/d/f", "gw2", 2) is not None


def test_adoption_past_concurrency_is_counted_and_blocks_grants() -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is not None
    assert table.adopt("c-old", "i-1", "t/d/f", "gw-b") is Adoption.ADOPTED  # its request is in flight
    assert (table.in_use("i-1"), table.free("i-1", 1)) == (2, 0)


@pytest.mark.parametrize("gone", ["release", "expire", "drop_instance"])
def test_released_or_expired_lease_is_never_adopted(gone: str) -> None:
    clock = Clock()
    table = ClaimTable(clock, ttl_s=10)
    claim = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert claim is not None
    if gone == "release":
        table.release(claim.claim_id, "gw")
    elif gone == "expire":
        clock.now += 10
        assert table.expire() == [claim]
    else:
        table.drop_instance("i-1")
    # A report that raced the release (it was sent before it) lists the claim once more.
    assert table.adopt(claim.claim_id, "i-1", "t/d/f", "gw") is Adoption.RELEASED
    assert table.in_use("i-1") == 0


def test_release_of_unknown_id_blocks_a_later_adoption() -> None:
    """After a failover the gateway's ReleaseClaim can reach the new leader before its report."""
    table = ClaimTable(Clock(), ttl_s=10)
    assert table.release("c-from-old-leader", "gw") is None
    assert table.adopt("c-from-old-leader", "i-1", "t/d/f", "gw") is Adoption.RELEASED
    assert len(table) == 0


def test_report_restarts_ttl_of_a_known_lease() -> None:
    clock = Clock()
    table = ClaimTable(clock, ttl_s=10)
    claim = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert claim is not None
    clock.now += 9
    assert table.adopt(claim.claim_id, "i-1", "t/d/f", "gw") is Adoption.REFRESHED
    clock.now += 9  # 18 s after the grant, 9 s after the report
    assert table.expire() == [] and table.in_use("i-1") == 1
    clock.now += 1
    assert [g.claim_id for g in table.expire()] == [claim.claim_id]


def test_adopted_lease_expires_with_the_normal_ttl() -> None:
    clock = Clock()
    table = ClaimTable(clock, ttl_s=10)
    table.adopt("c-old", "i-1", "t/d/f", "dead-gw")
    clock.now += 10
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is not None


def test_retired_instance_adopts_nothing() -> None:
    table = ClaimTable(Clock(), ttl_s=10)
    assert table.retire("i-1")
    assert table.adopt("c-old", "i-1", "t/d/f", "gw") is Adoption.RETIRED
    assert table.in_use("i-1") == 0


def test_lease_left_out_of_a_later_report_is_released() -> None:
    table = ClaimTable(Clock(), ttl_s=600)
    reported = table.try_grant("i-1", "t/d/f", "gw", 4)
    unreported = table.try_grant("i-1", "t/d/f", "gw", 4)  # granted after the report was taken
    other_gw = table.try_grant("i-1", "t/d/f", "gw-2", 4)
    assert reported and unreported and other_gw
    table.adopt(reported.claim_id, "i-1", "t/d/f", "gw")
    table.adopt(other_gw.claim_id, "i-1", "t/d/f", "gw-2")
    table.adopt("c-old", "i-1", "t/d/f", "gw")
    # gw's next report lists nothing: its ReleaseClaim calls were lost, the slots come back now.
    dropped = table.drop_unreported("gw", set())
    assert {g.claim_id for g in dropped} == {reported.claim_id, "c-old"}
    assert table.in_use("i-1") == 2  # the unreported grant and the other gateway's claim stay
    assert table.adopt("c-old", "i-1", "t/d/f", "gw") is Adoption.RELEASED


def test_clear_forgets_leases_but_not_released_ids() -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    held = table.try_grant("i-1", "t/d/f", "gw", 2)
    gone = table.try_grant("i-1", "t/d/f", "gw", 2)
    assert held and gone
    table.release(gone.claim_id, "gw")
    table.clear()  # deposed, then elected again: the gateway still holds ``held``
    assert table.adopt(held.claim_id, "i-1", "t/d/f", "gw") is Adoption.ADOPTED
    assert table.adopt(gone.claim_id, "i-1", "t/d/f", "gw") is Adoption.RELEASED


def test_released_ids_are_remembered_boundedly() -> None:
    table = ClaimTable(Clock(), ttl_s=60)
    for n in range(_REMEMBER_RELEASED + 1):
        table.release(f"c-{n}", "gw")
    assert table.adopt("c-0", "i-1", "t/d/f", "gw") is Adoption.ADOPTED  # the oldest was forgotten
    assert table.adopt("c-1", "i-1", "t/d/f", "gw") is Adoption.RELEASED


# Ownership: a claim belongs to the gateway it was granted to (or that reported it first).

def test_another_gateway_cannot_release_refresh_or_poison_a_claim() -> None:
    clock = Clock()
    table = ClaimTable(clock, ttl_s=10)
    mine = table.try_grant("i-1", "t/d/f", "gw-a", 2)
    assert mine is not None and table.get(mine.claim_id) == mine
    assert table.release(mine.claim_id, "gw-b") is None  # not gw-b's: it stays
    assert table.in_use("i-1") == 1
    clock.now += 9
    assert table.adopt(mine.claim_id, "i-1", "t/d/f", "gw-b") is Adoption.FOREIGN  # no refresh
    clock.now += 1
    assert table.expire() == [mine]
    # gw-b released an id gw-a holds on a leader that has not adopted it yet: gw-a still can.
    assert table.release("c-prev-term", "gw-b") is None
    assert table.adopt("c-prev-term", "i-1", "t/d/f", "gw-a") is Adoption.ADOPTED
    assert table.was_released("gw-b", "c-prev-term") and not table.was_released("gw-a", "c-prev-term")
