"""snapwake.lifecycle: the state sets every service asks about, and the moves allowed."""

from __future__ import annotations

import pytest

from snapwake import lifecycle
from snapwake.lifecycle import CLAIMS_GPU, COUNTED, GONE, HOLDS_GPU, LIVE, SERVING, TERMINAL, TRANSITIONS
from snapwake.v1.types_pb2 import InstanceState

ALL = frozenset(InstanceState.values())

# state: (TERMINAL, GONE, LIVE, SERVING, COUNTED, HOLDS_GPU, CLAIMS_GPU)
MEMBERSHIP = {
    InstanceState.INSTANCE_STATE_UNSPECIFIED: (0, 0, 0, 0, 0, 0, 0),
    InstanceState.INSTANCE_STATE_CREATING: (0, 0, 1, 0, 1, 0, 1),
    InstanceState.INSTANCE_STATE_SNAPSHOTTING: (0, 0, 1, 0, 0, 1, 1),
    InstanceState.INSTANCE_STATE_STARTING: (0, 0, 1, 0, 1, 1, 1),
    InstanceState.INSTANCE_STATE_STANDBY: (0, 0, 1, 0, 0, 0, 0),
    InstanceState.INSTANCE_STATE_RESTORING: (0, 0, 1, 0, 1, 1, 1),
    InstanceState.INSTANCE_STATE_RUNNING: (0, 0, 1, 1, 1, 1, 1),
    InstanceState.INSTANCE_STATE_IDLE: (0, 0, 1, 1, 1, 1, 1),
    InstanceState.INSTANCE_STATE_STOPPING: (0, 1, 0, 0, 0, 0, 0),
    InstanceState.INSTANCE_STATE_ENDED: (1, 1, 0, 0, 0, 0, 0),
    InstanceState.INSTANCE_STATE_FAILED: (1, 1, 0, 0, 0, 0, 0),
}


def test_the_table_covers_every_state() -> None:
    assert set(MEMBERSHIP) == set(TRANSITIONS) == ALL


@pytest.mark.parametrize(("state", "expected"), MEMBERSHIP.items(), ids=lambda v: InstanceState.Name(v) if isinstance(v, int) else "")
def test_state_sets(state: InstanceState, expected: tuple[int, ...]) -> None:
    sets = (TERMINAL, GONE, LIVE, SERVING, COUNTED, HOLDS_GPU, CLAIMS_GPU)
    assert tuple(int(state in s) for s in sets) == expected


def test_nothing_comes_back_from_the_gone_states() -> None:
    for state in GONE:
        assert lifecycle.allowed_moves(state) <= GONE


@pytest.mark.parametrize(("current", "new", "ok"), [
    (InstanceState.INSTANCE_STATE_IDLE, InstanceState.INSTANCE_STATE_STANDBY, True),
    (InstanceState.INSTANCE_STATE_STANDBY, InstanceState.INSTANCE_STATE_FAILED, True),  # any live state may fail
    (InstanceState.INSTANCE_STATE_SNAPSHOTTING, InstanceState.INSTANCE_STATE_STOPPING, True),  # or be stopped
    (InstanceState.INSTANCE_STATE_STOPPING, InstanceState.INSTANCE_STATE_FAILED, False),
    (InstanceState.INSTANCE_STATE_FAILED, InstanceState.INSTANCE_STATE_ENDED, True),
    (InstanceState.INSTANCE_STATE_ENDED, InstanceState.INSTANCE_STATE_FAILED, False),
    (InstanceState.INSTANCE_STATE_UNSPECIFIED, InstanceState.INSTANCE_STATE_STOPPING, False),
])
def test_check_transition(current: InstanceState, new: InstanceState, ok: bool) -> None:
    assert (new in lifecycle.allowed_moves(current)) is ok
    if ok:
        lifecycle.check_transition("i-1", current, new)
    else:
        with pytest.raises(lifecycle.IllegalTransition, match=f"instance i-1: {InstanceState.Name(current)} -> {InstanceState.Name(new)}"):
            lifecycle.check_transition("i-1", current, new)
