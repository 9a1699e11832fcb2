"""The instance lifecycle: one enum, one transition table, illegal moves raise.

    CREATING --> SNAPSHOTTING --> ENDED                (snapshot stored, container ends)
    CREATING --> STARTING --> STANDBY --> RESTORING --> RUNNING <--> IDLE --> STOPPING --> ENDED
                         \\--> RUNNING (normal start)              IDLE --> STANDBY (suspend)
    any live state --> FAILED | STOPPING

The sets of states that the services ask about are defined here, once, from the table.
States are typed ``InstanceState``: protoc's stubs type the members so (there is no
``InstanceState.ValueType`` without mypy-protobuf), and a plain ``int`` would not say which enum.
"""

from __future__ import annotations

import logging

from snapwake.v1.types_pb2 import (
    INSTANCE_STATE_CREATING,
    INSTANCE_STATE_ENDED,
    INSTANCE_STATE_FAILED,
    INSTANCE_STATE_IDLE,
    INSTANCE_STATE_RESTORING,
    INSTANCE_STATE_RUNNING,
    INSTANCE_STATE_SNAPSHOTTING,
    INSTANCE_STATE_STANDBY,
    INSTANCE_STATE_STARTING,
    INSTANCE_STATE_STOPPING,
    INSTANCE_STATE_UNSPECIFIED,
    InstanceState,
)

__all__ = ["CLAIMS_GPU", "COUNTED", "GONE", "HOLDS_GPU", "IllegalTransition", "LIVE", "SERVING",
           "TERMINAL", "TRANSITIONS", "allowed_moves", "check_transition"]

log = logging.getLogger(__name__)

TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    INSTANCE_STATE_UNSPECIFIED: frozenset({INSTANCE_STATE_CREATING}),
    INSTANCE_STATE_CREATING: frozenset({INSTANCE_STATE_SNAPSHOTTING, INSTANCE_STATE_STARTING}),
    INSTANCE_STATE_SNAPSHOTTING: frozenset({INSTANCE_STATE_ENDED}),
    INSTANCE_STATE_STARTING: frozenset({INSTANCE_STATE_STANDBY, INSTANCE_STATE_RUNNING, INSTANCE_STATE_IDLE}),
    INSTANCE_STATE_STANDBY: frozenset({INSTANCE_STATE_RESTORING}),
    INSTANCE_STATE_RESTORING: frozenset({INSTANCE_STATE_RUNNING, INSTANCE_STATE_IDLE}),
    INSTANCE_STATE_RUNNING: frozenset({INSTANCE_STATE_IDLE}),
    INSTANCE_STATE_IDLE: frozenset({INSTANCE_STATE_RUNNING, INSTANCE_STATE_STANDBY}),
    INSTANCE_STATE_STOPPING: frozenset({INSTANCE_STATE_ENDED}),
    INSTANCE_STATE_ENDED: frozenset(),
    INSTANCE_STATE_FAILED: frozenset({INSTANCE_STATE_STOPPING, INSTANCE_STATE_ENDED}),
}
# Over: the container is gone (or should be); the nodeagent removes the key after a linger.
TERMINAL = frozenset({INSTANCE_STATE_ENDED, INSTANCE_STATE_FAILED})
# Serving nothing any more and never again: over, or on the way out. Claims on these
# instances are forgotten (and never adopted).
GONE = TERMINAL | {INSTANCE_STATE_STOPPING}
# Any state that is not over and not on the way out; such an instance may fail or be stopped.
LIVE = frozenset(TRANSITIONS) - GONE - {INSTANCE_STATE_UNSPECIFIED}
# The instance's weights are on its GPU and it answers requests.
SERVING = frozenset({INSTANCE_STATE_RUNNING, INSTANCE_STATE_IDLE})
# Serving or about to: what counts against a function's max_instances.
COUNTED = SERVING | {INSTANCE_STATE_CREATING, INSTANCE_STATE_STARTING, INSTANCE_STATE_RESTORING}
# The instance's GPU slice is allocated now (a standby holds none, a creating one none yet).
HOLDS_GPU = SERVING | {INSTANCE_STATE_SNAPSHOTTING, INSTANCE_STATE_STARTING, INSTANCE_STATE_RESTORING}
# The slice is allocated or about to be: what placement subtracts from a GPU's free memory.
# STARTING is in because even a standby attaches its weights once while warming up.
CLAIMS_GPU = HOLDS_GPU | {INSTANCE_STATE_CREATING}


class IllegalTransition(RuntimeError):
    """A bug: some code tried a move the lifecycle does not allow."""


def allowed_moves(current: InstanceState) -> frozenset[InstanceState]:
    """The states ``current`` may move to: its row of the table, plus FAILED and STOPPING while live."""
    allowed = TRANSITIONS.get(current, frozenset())
    return allowed | {INSTANCE_STATE_FAILED, INSTANCE_STATE_STOPPING} if current in LIVE else allowed


def check_transition(instance_id: str, current: InstanceState, new: InstanceState) -> None:
    """Raises ``IllegalTransition`` unless ``current -> new`` is allowed; logs the move."""
    if new not in allowed_moves(current):
        raise IllegalTransition(
            f"instance {instance_id}: {InstanceState.Name(current)} -> {InstanceState.Name(new)} is not allowed")
    log.info("%s -> %s", InstanceState.Name(current), InstanceState.Name(new), extra={"instance_id": instance_id})
