"""The nodeagent's per-instance state machine: start plans, RUNNING/IDLE (a user image's from its
traffic), moves and expiry."""

from __future__ import annotations

import pytest

from services.nodeagent.machine import InstanceMachine, StartPlan, activity_move, plan_start, traffic_inflight
from snapwake.lifecycle import IllegalTransition
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState

T = nodeagent_pb2.StartTarget


@pytest.mark.parametrize(("target", "first", "mode", "goal"), [
    (T.START_TARGET_RUNNING, InstanceState.INSTANCE_STATE_STARTING, "load", InstanceState.INSTANCE_STATE_RUNNING),
    (T.START_TARGET_STANDBY, InstanceState.INSTANCE_STATE_STARTING, "standby", InstanceState.INSTANCE_STATE_STANDBY),
    (T.START_TARGET_SNAPSHOT, InstanceState.INSTANCE_STATE_SNAPSHOTTING, "snapshot", InstanceState.INSTANCE_STATE_ENDED),
])
def test_plan_start(target: int, first: int, mode: str, goal: int) -> None:
    plan = plan_start(target)
    assert plan is not None
    assert (plan.first, plan.start_mode, plan.goal) == (first, mode, goal)


def test_plan_start_rejects_unspecified() -> None:
    assert plan_start(T.START_TARGET_UNSPECIFIED) is None


@pytest.mark.parametrize(("state", "inflight", "expected"), [
    (InstanceState.INSTANCE_STATE_RUNNING, 0, InstanceState.INSTANCE_STATE_IDLE),
    (InstanceState.INSTANCE_STATE_RUNNING, 2, None),
    (InstanceState.INSTANCE_STATE_IDLE, 1, InstanceState.INSTANCE_STATE_RUNNING),
    (InstanceState.INSTANCE_STATE_IDLE, 0, None),
    (InstanceState.INSTANCE_STATE_STANDBY, 3, None),
    (InstanceState.INSTANCE_STATE_STARTING, 0, None),
])
def test_activity_move(state: int, inflight: int, expected: int | None) -> None:
    assert activity_move(state, inflight) == expected


@pytest.mark.parametrize(("quiet_s", "limit_s", "inflight"), [
    (0.0, 1.0, 1),    # bytes are moving now
    (0.99, 1.0, 1),
    (1.0, 1.0, 0),    # quiet for the whole limit: idle
    (42.0, 1.0, 0),   # a silent keep-alive connection changes nothing: only bytes count
    (2.0, 5.0, 1),
])
def test_traffic_inflight(quiet_s: float, limit_s: float, inflight: int) -> None:
    assert traffic_inflight(quiet_s, limit_s) == inflight


@pytest.mark.parametrize(("state", "quiet_s", "expected"), [
    (InstanceState.INSTANCE_STATE_RUNNING, 3.0, InstanceState.INSTANCE_STATE_IDLE),
    (InstanceState.INSTANCE_STATE_RUNNING, 0.2, None),
    (InstanceState.INSTANCE_STATE_IDLE, 0.2, InstanceState.INSTANCE_STATE_RUNNING),
    (InstanceState.INSTANCE_STATE_IDLE, 3.0, None),
])
def test_a_user_images_traffic_moves_it_between_running_and_idle(state: int, quiet_s: float,
                                                                 expected: int | None) -> None:
    assert activity_move(state, traffic_inflight(quiet_s, 1.0)) == expected


def _machine(now: float = 100.0) -> InstanceMachine:
    return InstanceMachine(types_pb2.Instance(id="i-000000000001"), now)


@pytest.mark.parametrize(("path", "ok"), [
    ([InstanceState.INSTANCE_STATE_STARTING, InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE, InstanceState.INSTANCE_STATE_STANDBY,
      InstanceState.INSTANCE_STATE_RESTORING, InstanceState.INSTANCE_STATE_RUNNING], True),
    ([InstanceState.INSTANCE_STATE_SNAPSHOTTING, InstanceState.INSTANCE_STATE_ENDED], True),
    ([InstanceState.INSTANCE_STATE_STARTING, InstanceState.INSTANCE_STATE_FAILED], True),
    ([InstanceState.INSTANCE_STATE_STARTING, InstanceState.INSTANCE_STATE_STOPPING, InstanceState.INSTANCE_STATE_ENDED], True),
    ([InstanceState.INSTANCE_STATE_RUNNING], False),                                   # CREATING cannot serve
    ([InstanceState.INSTANCE_STATE_SNAPSHOTTING, InstanceState.INSTANCE_STATE_RUNNING], False),
    ([InstanceState.INSTANCE_STATE_STARTING, InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_STANDBY], False),  # only IDLE suspends
    ([InstanceState.INSTANCE_STATE_STARTING, InstanceState.INSTANCE_STATE_FAILED, InstanceState.INSTANCE_STATE_RUNNING], False),
])
def test_paths(path: list[int], ok: bool) -> None:
    machine = _machine()

    def walk() -> None:
        for i, state in enumerate(path):
            assert machine.can_move(state) or not ok
            machine.move(state, 101.0 + i)

    if ok:
        walk()
        assert machine.state == path[-1]
    else:
        with pytest.raises(IllegalTransition):
            walk()


def test_move_stamps_times_and_message() -> None:
    machine = _machine(100.0)
    assert machine.state == InstanceState.INSTANCE_STATE_CREATING
    assert machine.instance.create_time.ToNanoseconds() == 100 * 10**9
    machine.move(InstanceState.INSTANCE_STATE_STARTING, 102.5)
    machine.move(InstanceState.INSTANCE_STATE_FAILED, 103.0, "boom")
    assert machine.instance.update_time.ToNanoseconds() == 103 * 10**9
    assert machine.instance.message == "boom"
    assert machine.entered_at[InstanceState.INSTANCE_STATE_STARTING] == 102.5
    assert not machine.live


@pytest.mark.parametrize(("final", "now", "linger", "expired"), [
    (InstanceState.INSTANCE_STATE_ENDED, 110.0, 5.0, True),
    (InstanceState.INSTANCE_STATE_ENDED, 104.0, 5.0, False),
    (InstanceState.INSTANCE_STATE_FAILED, 105.0, 5.0, True),
    (InstanceState.INSTANCE_STATE_RUNNING, 500.0, 5.0, False),
])
def test_expired(final: int, now: float, linger: float, expired: bool) -> None:
    machine = _machine(90.0)
    machine.move(InstanceState.INSTANCE_STATE_STARTING, 95.0)
    if final == InstanceState.INSTANCE_STATE_ENDED:
        machine.move(InstanceState.INSTANCE_STATE_STOPPING, 99.0)
    machine.move(final, 100.0)
    assert machine.expired(now, linger) is expired


def test_start_plan_values_are_distinct() -> None:
    assert len({p.start_mode for p in StartPlan}) == len(StartPlan)
