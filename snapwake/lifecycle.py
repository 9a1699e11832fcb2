"""The instance lifecycle: one enum, one transition table, illegal moves raise.

    CREATING --> SNAPSHOTTING --> ENDED                (snapshot stored, container ends)
    CREATING --> STARTING --> STANDBY --> RESTORING --> RUNNING <--> IDLE --> STOPPING --> ENDED
                         \\--> RUNNING (normal start)              IDLE --> STANDBY (suspend)
    any live state --> FAILED | STOPPING
"""

from __future__ import annotations

import logging

from snapwake.v1.types_pb2 import InstanceState

__all__ = ["IllegalTransition", "LIVE", "SERVING", "TRANSITIONS", "check_transition"]

log = logging.getLogger(__name__)
S = InstanceState

TRANSITIONS: dict[int, frozenset[int]] = {
    S.INSTANCE_STATE_UNSPECIFIED: frozenset({S.INSTANCE_STATE_CREATING}),
    S.INSTANCE_STATE_CREATING: frozenset({S.INSTANCE_STATE_SNAPSHOTTING, S.INSTANCE_STATE_STARTING}),
    S.INSTANCE_STATE_SNAPSHOTTING: frozenset({S.INSTANCE_STATE_ENDED}),
    S.INSTANCE_STATE_STARTING: frozenset({S.INSTANCE_STATE_STANDBY, S.INSTANCE_STATE_RUNNING,
                                          S.INSTANCE_STATE_IDLE}),
    S.INSTANCE_STATE_STANDBY: frozenset({S.INSTANCE_STATE_RESTORING}),
    S.INSTANCE_STATE_RESTORING: frozenset({S.INSTANCE_STATE_RUNNING, S.INSTANCE_STATE_IDLE}),
    S.INSTANCE_STATE_RUNNING: frozenset({S.INSTANCE_STATE_IDLE}),
    S.INSTANCE_STATE_IDLE: frozenset({S.INSTANCE_STATE_RUNNING, S.INSTANCE_STATE_STANDBY}),
    S.INSTANCE_STATE_STOPPING: frozenset({S.INSTANCE_STATE_ENDED}),
    S.INSTANCE_STATE_ENDED: frozenset(),
    S.INSTANCE_STATE_FAILED: frozenset({S.INSTANCE_STATE_STOPPING, S.INSTANCE_STATE_ENDED}),
}
# Any state that is not over may fail or be stopped.
LIVE = frozenset(s for s in TRANSITIONS if s not in (
    S.INSTANCE_STATE_UNSPECIFIED, S.INSTANCE_STATE_ENDED, S.INSTANCE_STATE_FAILED, S.INSTANCE_STATE_STOPPING))
# States in which the instance's weights are on its GPU and it answers requests.
SERVING = frozenset({S.INSTANCE_STATE_RUNNING, S.INSTANCE_STATE_IDLE})


class IllegalTransition(RuntimeError):
    """A bug: some code tried a move the lifecycle does not allow."""


def check_transition(instance_id: str, current: int, new: int) -> None:
    """Raises ``IllegalTransition`` unless ``current -> new`` is allowed; logs the move."""
    allowed = TRANSITIONS.get(current, frozenset())
    if current in LIVE:
        allowed = allowed | {S.INSTANCE_STATE_FAILED, S.INSTANCE_STATE_STOPPING}
    if new not in allowed:
        raise IllegalTransition(
            f"instance {instance_id}: {S.Name(current)} -> {S.Name(new)} is not allowed")
    log.info("%s -> %s", S.Name(current), S.Name(new), extra={"instance_id": instance_id})
