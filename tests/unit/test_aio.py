"""snapwake.aio.cancel_and_wait: a stop is bounded even when a task ignores its cancellation."""

from __future__ import annotations

import asyncio
import time

from snapwake.aio import cancel_and_wait


async def test_cancelled_tasks_end_and_nothing_is_left() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def fails() -> None:
        raise RuntimeError("boom")

    broken = asyncio.create_task(fails())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(forever()) for _ in range(3)]
    assert await cancel_and_wait([*tasks, broken, None], timeout_s=2) == []
    assert all(t.cancelled() for t in tasks)


async def test_a_task_that_swallows_its_cancellation_is_given_up_on_after_the_bound(caplog) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # a misbehaving stream that will not end

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    t0 = time.monotonic()
    left = await cancel_and_wait([task], timeout_s=0.3, what="test")
    assert left == [task] and 0.25 <= time.monotonic() - t0 < 2
    assert "stubborn" in caplog.text and "did not end within 0.3s" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait([task], timeout=2)
