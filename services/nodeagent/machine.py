"""The per-instance state machine (pure): the lifecycle of snapwake.lifecycle plus timestamps.

The agent owns one ``InstanceMachine`` per container. Every move goes through
``check_transition`` (an illegal move is a bug and raises) and stamps when the state was
entered; the yes/no questions the reconcile loop asks are derived from those stamps.
"""

from __future__ import annotations

import enum

from google.protobuf.timestamp_pb2 import Timestamp

from snapwake.lifecycle import LIVE, TERMINAL, allowed_moves, check_transition
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState

__all__ = ["InstanceMachine", "StartPlan", "activity_move", "modelserver_start_mode", "plan_start", "traffic_inflight"]

T = nodeagent_pb2.StartTarget


class StartPlan(enum.Enum):
    """How a StartInstance target unfolds: (state after CREATING, model server --start-mode, goal)."""

    RUNNING = (InstanceState.INSTANCE_STATE_STARTING, "load", InstanceState.INSTANCE_STATE_RUNNING)
    STANDBY = (InstanceState.INSTANCE_STATE_STARTING, "standby", InstanceState.INSTANCE_STATE_STANDBY)
    SNAPSHOT = (InstanceState.INSTANCE_STATE_SNAPSHOTTING, "snapshot", InstanceState.INSTANCE_STATE_ENDED)

    @property
    def first(self) -> types_pb2.InstanceState:
        return self.value[0]

    @property
    def start_mode(self) -> str:
        return str(self.value[1])

    @property
    def goal(self) -> types_pb2.InstanceState:
        return self.value[2]


_PLANS: dict[int, StartPlan] = {T.START_TARGET_RUNNING: StartPlan.RUNNING, T.START_TARGET_STANDBY: StartPlan.STANDBY,
          T.START_TARGET_SNAPSHOT: StartPlan.SNAPSHOT}


def plan_start(target: int) -> StartPlan | None:
    """The plan for a StartInstance target, or None when the target is not a valid one."""
    return _PLANS.get(target)


def modelserver_start_mode(plan: StartPlan, process_mode: bool) -> str:
    """The model server's ``--start-mode``: a PROCESS-mode standby is a normal ``load``, because the
    driver, not the model server, takes its GPU state away."""
    return "load" if plan is StartPlan.STANDBY and process_mode else plan.start_mode


def activity_move(state: types_pb2.InstanceState, inflight: int) -> types_pb2.InstanceState | None:
    """RUNNING <-> IDLE from the model server's in-flight count; None when nothing changes."""
    if state == InstanceState.INSTANCE_STATE_RUNNING and inflight == 0:
        return InstanceState.INSTANCE_STATE_IDLE
    if state == InstanceState.INSTANCE_STATE_IDLE and inflight > 0:
        return InstanceState.INSTANCE_STATE_RUNNING
    return None


def traffic_inflight(quiet_s: float, user_idle_quiet_s: float) -> int:
    """A user image's in-flight signal for ``activity_move``: 1 while bytes moved through its
    forwarder within the last ``user_idle_quiet_s`` seconds (``quiet_s`` ago), else 0.

    Such a server has no control socket to count its requests, so the node goes by bytes, not by
    open connections: a keep-alive connection that is open but silent is idle (gateways keep
    their connections open between requests). Why a quiet spell is enough: IDLE alone parks or
    stops nothing. The scheduler suspends or stops only an IDLE instance on which no claim is
    held, and idle for longer than the function's ``idle_timeout`` (from the move to IDLE); the
    gateway holds a claim for every request until its response has completed. So a request
    that looks quiet here (a long prefill before the first byte of the answer) may let the
    instance read IDLE for a while, and its claim still keeps it from being parked; its first
    answer byte moves it back to RUNNING, which restarts the idle clock."""
    return 1 if quiet_s < user_idle_quiet_s else 0


def _stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class InstanceMachine:
    """One instance's actual state, as reported to etcd."""

    def __init__(self, instance: types_pb2.Instance, now: float) -> None:
        self.instance = instance
        self.entered_at: dict[types_pb2.InstanceState, float] = {}
        self.instance.create_time.CopyFrom(_stamp(now))
        self.move(InstanceState.INSTANCE_STATE_CREATING, now)

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def state(self) -> types_pb2.InstanceState:
        return self.instance.state

    @property
    def live(self) -> bool:
        """Not yet stopping, ended or failed: the container should be up."""
        return self.state in LIVE

    def move(self, new: types_pb2.InstanceState, now: float, message: str = "") -> types_pb2.Instance:
        """Moves to ``new`` (raising ``IllegalTransition`` if the lifecycle forbids it)."""
        check_transition(self.id, self.state, new)
        self.instance.state = new
        self.instance.update_time.CopyFrom(_stamp(now))
        if message:
            self.instance.message = message
        self.entered_at[new] = now
        return self.instance

    def can_move(self, new: types_pb2.InstanceState) -> bool:
        """Whether ``new`` is allowed now (without logging a move)."""
        return new in allowed_moves(self.state)

    def expired(self, now: float, linger: float) -> bool:
        """An ENDED or FAILED instance whose key has been visible for ``linger`` seconds."""
        if self.state not in TERMINAL:
            return False
        return now - self.entered_at.get(self.state, now) >= linger
