"""DriverGate: restores and checkpoints each capped and FIFO, independent of each other, every wait bounded.

Each test drives the gate with asyncio tasks and explicit events, and reads the order in which
work started from a shared log, so no result depends on timing (``settle`` lets every ready task
run; the only timeouts are the gate's own bounds under test and a guard on each test).
"""

from __future__ import annotations

import asyncio

import pytest

from services.nodeagent.admission import DriverGate
from snapwake import errors

pytestmark = pytest.mark.timeout(10)
LONG = 5.0  # a bound no test should reach


async def settle() -> None:
    """Runs every task that can run now (a few loop turns: each hand-off takes one or two)."""
    for _ in range(10):
        await asyncio.sleep(0)


class Work:
    """Tasks that take a gate slot, log when they start, and hold it until released."""

    def __init__(self, gate: DriverGate) -> None:
        self.gate, self.started, self.waited = gate, [], {}
        self._done: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def go(self, name: str, limit_s: float = LONG) -> asyncio.Task[None]:
        kind = self.gate.restore if name.startswith("r") else self.gate.checkpoint
        self._done[name] = asyncio.Event()

        async def run() -> None:
            async with kind(limit_s) as waited:
                self.started.append(name)
                self.waited[name] = waited
                await self._done[name].wait()

        self.tasks[name] = asyncio.create_task(run(), name=name)
        return self.tasks[name]

    async def finish(self, *names: str) -> None:
        for name in names:
            self._done[name].set()
        for name in names:
            await self.tasks[name]
        await settle()


async def test_restores_run_up_to_the_cap_then_queue_in_order() -> None:
    work = Work(DriverGate(max_restores=2))
    for name in ("r1", "r2", "r3", "r4"):
        work.go(name)
    await settle()
    assert work.started == ["r1", "r2"] and work.gate.restores_waiting == 2
    await work.finish("r2")
    assert work.started == ["r1", "r2", "r3"]
    await work.finish("r1", "r3")
    assert work.started == ["r1", "r2", "r3", "r4"]
    await work.finish("r4")
    assert (work.gate.restoring, work.gate.restores_waiting) == (0, 0)


async def test_a_checkpoint_does_not_wait_for_restores() -> None:
    """Parking frees the GPU room that queued restores need: it must not wait behind them."""
    work = Work(DriverGate(max_restores=1))
    work.go("r1")
    work.go("r2")  # waits for r1's slot
    await settle()
    work.go("c1")
    await settle()
    assert work.started == ["r1", "c1"] and work.gate.restores_waiting == 1
    await work.finish("r1")
    assert work.started == ["r1", "c1", "r2"]
    await work.finish("c1", "r2")


async def test_a_restore_never_waits_for_a_running_checkpoint() -> None:
    work = Work(DriverGate(max_restores=2))
    work.go("c1")
    await settle()
    work.go("r1")
    work.go("r2")
    await settle()
    assert work.started == ["c1", "r1", "r2"]
    assert work.waited["r1"] < 1.0 and work.waited["r2"] < 1.0
    await work.finish("c1", "r1", "r2")


async def test_checkpoints_run_two_at_a_time_by_default_in_order() -> None:
    work = Work(DriverGate())
    for name in ("c1", "c2", "c3", "c4"):
        work.go(name)
    await settle()
    assert work.started == ["c1", "c2"] and work.gate.checkpoints_waiting == 2
    await work.finish("c1")
    assert work.started == ["c1", "c2", "c3"]
    await work.finish("c2", "c3", "c4")
    assert work.started == ["c1", "c2", "c3", "c4"]


async def test_one_checkpoint_at_a_time_when_configured() -> None:
    work = Work(DriverGate(max_checkpoints=1))
    for name in ("c1", "c2"):
        work.go(name)
    await settle()
    assert work.started == ["c1"]
    await work.finish("c1", "c2")
    assert work.started == ["c1", "c2"]


async def test_a_checkpoint_wait_is_bounded_and_names_what_runs() -> None:
    work = Work(DriverGate(max_checkpoints=1))
    work.go("c1")
    await settle()
    late = work.go("c2", limit_s=0.05)
    with pytest.raises(errors.DeadlineExceeded, match=r"checkpoint waited 0\.1s .*1 checkpoints running"):
        await late
    assert work.gate.checkpoints_waiting == 0 and work.gate.checkpointing == 1
    work.go("c3")  # the timed-out waiter left nothing behind
    await work.finish("c1")
    assert work.started == ["c1", "c3"]
    await work.finish("c3")


async def test_a_restore_wait_is_bounded_too() -> None:
    work = Work(DriverGate(max_restores=1))
    work.go("r1")
    await settle()
    with pytest.raises(errors.DeadlineExceeded, match="restore waited"):
        await work.go("r2", limit_s=0.05)
    assert work.gate.restores_waiting == 0 and work.gate.restoring == 1
    await work.finish("r1")
    assert work.gate.restoring == 0


async def test_a_cancelled_restore_waiter_leaves_nothing_behind() -> None:
    work = Work(DriverGate(max_restores=1))
    work.go("r1")
    work.go("r2")
    await settle()
    work.tasks["r2"].cancel()  # the caller gave up while r2 waited
    await settle()
    assert work.gate.restores_waiting == 0
    work.go("r3")
    await work.finish("r1")
    assert work.started == ["r1", "r3"]
    await work.finish("r3")


async def test_a_slot_granted_as_its_waiter_is_cancelled_goes_back() -> None:
    gate = DriverGate(max_restores=1)
    holder = gate.restore(LONG)
    await holder.__aenter__()
    work = Work(gate)
    work.go("r2")
    await settle()
    assert gate.restores_waiting == 1
    await holder.__aexit__(None, None, None)  # hands the slot to r2's future, without yielding ...
    work.tasks["r2"].cancel()  # ... so r2 is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await work.tasks["r2"]
    assert work.started == [] and (gate.restoring, gate.restores_waiting) == (0, 0)
    work.go("r3")
    await settle()
    assert work.started == ["r3"]
    await work.finish("r3")


async def test_the_wait_is_reported() -> None:
    work = Work(DriverGate(max_restores=1))
    work.go("r1")
    work.go("r2")
    await settle()
    await asyncio.sleep(0.05)
    await work.finish("r1")
    assert work.waited["r1"] < 0.05 <= work.waited["r2"] < LONG
    await work.finish("r2")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_restores": 0}, "max_restores: must be at least 1, got 0"),
    ({"max_checkpoints": -1}, "max_checkpoints: must be at least 1, got -1"),
])
def test_bad_limits_are_named(kwargs: dict[str, int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        DriverGate(**kwargs)
