"""Lease accounting with a fake clock: concurrency is never exceeded, TTLs expire."""

from __future__ import annotations

import pytest

from services.scheduler.lease import QueueDepths
from services.scheduler.leasetable import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("concurrency", "attempts", "granted"), [(1, 5, 1), (2, 20, 2), (4, 3, 3), (4, 4, 4)])
def test_never_past_concurrency(concurrency: int, attempts: int, granted: int) -> None:
    table = LeaseTable(Clock(), ttl_s=60)
    got = [table.try_grant("i-1", "t/d/f", "gw", concurrency) for _ in range(attempts)]
    assert sum(g is not None for g in got) == granted
    assert table.in_use("i-1") == granted
    assert len({g.lease_id for g in got if g}) == granted


def test_release_frees_a_slot_and_unknown_release_is_noop() -> None:
    table = LeaseTable(Clock(), ttl_s=60)
    a = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert a is not None and table.try_grant("i-1", "t/d/f", "gw", 1) is None
    assert table.release(a.lease_id) == a
    assert table.release(a.lease_id) is None
    assert table.release("l-unknown") is None
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is not None


def test_ttl_expiry_returns_slots_of_a_dead_gateway() -> None:
    clock = Clock()
    table = LeaseTable(clock, ttl_s=10)
    assert table.try_grant("i-1", "t/d/f", "dead-gw", 1) is not None
    clock.now += 9.9
    assert table.try_grant("i-1", "t/d/f", "gw", 1) is None
    clock.now += 0.2
    lease = table.try_grant("i-1", "t/d/f", "gw", 1)
    assert lease is not None and lease.gateway_id == "gw" and len(table) == 1


def test_drop_instance_and_busy() -> None:
    table = LeaseTable(Clock(), ttl_s=10)
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
    table = LeaseTable(clock=lambda: 0.0, ttl_s=60)
    held = table.try_grant("i-busy", "t/n/f", "g", concurrency=2)
    assert held is not None
    assert table.retire("i-busy") is False
    assert table.try_grant("i-busy", "t/n/f", "g", concurrency=2) is not None
    assert table.retire("i-idle") is True
    assert table.try_grant("i-idle", "t/n/f", "g", concurrency=2) is None
