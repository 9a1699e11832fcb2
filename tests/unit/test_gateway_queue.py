"""The queue's pure core (admission and bookkeeping), and its report of held claims."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from services.gateway.queue import Admission, ClaimQueue, QueueBook
from services.gateway.scheduler_client import Claim, FunctionInfo
from services.gateway.scheduler_fake import InMemoryScheduler

A, F = Admission.ADMITTED, Admission.FULL


@pytest.mark.parametrize(("steps", "expected_depth"), [
    # (op, function, limit) -> expected admission for "enter"
    ([("enter", "f", 1, A)], 1),
    ([("enter", "f", 1, A), ("enter", "f", 1, F)], 1),
    ([("enter", "f", 2, A), ("enter", "f", 2, A), ("enter", "f", 2, F)], 2),
    ([("enter", "f", 1, A), ("leave", "f", 0, None), ("enter", "f", 1, A)], 1),
    ([("enter", "f", 1, A), ("enter", "g", 1, A), ("enter", "g", 1, F)], 1),
    ([("enter", "f", 3, A), ("leave", "f", 0, None)], 0),
])
def test_admission_table(steps: list[tuple[str, str, int, Admission | None]], expected_depth: int) -> None:
    book = QueueBook()
    for op, function_id, limit, want in steps:
        if op == "enter":
            assert book.enter(function_id, limit) is want
        else:
            book.leave(function_id)
    assert book.depth("f") == expected_depth


def test_leave_without_enter_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="leave"):
        QueueBook().leave("f")


def test_zero_depths_are_reported_once_then_pruned() -> None:
    book = QueueBook()
    book.enter("f", 5)
    book.enter("g", 5)
    book.leave("g")
    assert book.depths() == {"f": 1, "g": 0}
    book.prune()
    assert book.depths() == {"f": 1}


async def test_held_leases_are_reported_until_released() -> None:
    """Every report lists the claims acquired and not yet released; one more report after the
    last release says they went, then the gateway falls quiet again."""
    scheduler = InMemoryScheduler()
    info = FunctionInfo("t/d/f", queue_len=5, queue_timeout=2)
    scheduler.deploy(info, ["127.0.0.1:9"], concurrency=2)
    queue = ClaimQueue(scheduler, default_len=5, default_timeout=2)
    reporter = asyncio.create_task(queue.report_forever(0.01))

    async def last_report_lists(*claims: Claim) -> None:
        want = {(claim.claim_id, claim.instance_id, "t/d/f") for claim in claims}
        deadline = time.monotonic() + 5
        while not scheduler.reported_claims or {
                (h.claim_id, h.instance_id, h.function_id) for h in scheduler.reported_claims[-1]} != want:
            assert time.monotonic() < deadline, f"no report listed {want}: {scheduler.reported_claims[-3:]}"
            await asyncio.sleep(0.01)

    try:
        first, second = await queue.acquire(info, "r1"), await queue.acquire(info, "r2")
        await last_report_lists(first, second)
        queue.release(first)
        await last_report_lists(second)
        queue.release(second)
        await last_report_lists()
        reports = len(scheduler.reported_claims)
        await asyncio.sleep(0.1)
        assert len(scheduler.reported_claims) == reports  # nothing held, nothing waiting: quiet
        assert [claim_id for claim_id, _ in scheduler.released] == [first.claim_id, second.claim_id]
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
