"""The crash-loop bound (pure): failures per revision, each instance once, within a window."""

from __future__ import annotations

import pytest

from services.scheduler.crashloop import CrashLoop, Restarts


def test_each_failed_instance_counts_once_within_the_window() -> None:
    book = CrashLoop(limit=3, window_s=10)
    assert book.note("f@1", "i-a", 0.0) and not book.note("f@1", "i-a", 1.0)  # seen again by the next pass
    book.note("f@1", "i-b", 2.0)
    assert (book.recent("f@1", 2.0), book.looping("f@1", 2.0)) == (2, False)
    book.note("f@1", "i-c", 3.0)
    assert book.looping("f@1", 3.0) and not book.looping("f@2", 3.0)  # a new revision starts afresh
    assert book.recent("f@1", 12.5) == 1 and not book.looping("f@1", 12.5)  # the window moved on


@pytest.mark.parametrize(("failures", "hold"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (9, 5.0)])
def test_restarts_back_off_doubling_up_to_a_cap(failures: int, hold: float) -> None:
    book = CrashLoop(limit=100, window_s=60, base_backoff_s=1.0, max_backoff_s=5.0)
    for n in range(failures):
        book.note("f@1", f"i-{n}", 10.0)
    assert book.hold_until("f@1", 10.0) == 10.0 + hold
    assert book.restarts("f@1", 10.0) is (Restarts.HOLD if failures else Restarts.START)
    assert book.restarts("f@1", 10.0 + hold + 0.01) is Restarts.START


def test_a_crash_loop_stops_the_restarts() -> None:
    book = CrashLoop(limit=2, window_s=60)
    book.note("f@1", "i-a", 0.0)
    book.note("f@1", "i-b", 1.0)
    assert book.restarts("f@1", 500.0) is Restarts.START  # long enough ago
    assert book.restarts("f@1", 2.0) is Restarts.STOP


def test_keep_forgets_deleted_functions_and_past_revisions() -> None:
    book = CrashLoop(limit=1, window_s=10)
    book.note("f@1", "i-a", 0.0)
    book.note("g@1", "i-b", 0.0)
    book.keep({"f@2", "g@1"})
    assert not book.looping("f@1", 0.0) and book.looping("g@1", 0.0)


def test_old_failures_are_pruned_but_a_fresh_one_is_never_recounted() -> None:
    book = CrashLoop(limit=5, window_s=10)
    book.note("f@1", "i-old", 0.0)
    assert book.note("f@1", "i-new", 25.0)  # i-old (older than two windows) is dropped here
    assert not book.note("f@1", "i-new", 26.0) and book.recent("f@1", 26.0) == 1
