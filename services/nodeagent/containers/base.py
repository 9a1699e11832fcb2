"""The one small interface the nodeagent uses to run containers.

``RuncContainers`` drives the real ``runc`` binary; ``FakeContainers`` runs the bundle's process as a
plain subprocess so the pure core can be unit-tested on machines without runc.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Containers", "ContainerState", "ContainerStatus"]


class ContainerStatus(enum.Enum):
    """runc's container status names."""

    CREATED = "created"  # created, init not yet started
    RUNNING = "running"  # init runs
    PAUSED = "paused"
    STOPPED = "stopped"  # init exited; the container still needs a delete


@dataclass(frozen=True)
class ContainerState:
    """What the container runtime knows about one container."""

    id: str
    status: ContainerStatus
    # Host pid of the container's init (0 once it stopped).
    pid: int
    # How init ended, once STOPPED: its exit code, or -N when signal N killed it. None while it
    # runs, and when the runtime cannot tell.
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.status in (ContainerStatus.CREATED, ContainerStatus.RUNNING, ContainerStatus.PAUSED)

    def ended(self) -> str:
        """How it ended, for a failure message: "exit status 3", "killed by signal 9", or
        "exit status unknown"."""
        if self.exit_code is None:
            return "exit status unknown"
        return f"killed by signal {-self.exit_code}" if self.exit_code < 0 else f"exit status {self.exit_code}"


class Containers(abc.ABC):
    """Creates and manages containers whose ids start with ``prefix``.

    Every method is bounded in time and raises ``snapwake.errors.Unavailable`` when the
    runtime itself fails (not when a container merely is not there).
    """

    prefix: str
    # Whether each container has a network namespace of its own (the forwarder then refuses to
    # carry connections into the host's).
    isolates_network: bool = True

    @abc.abstractmethod
    async def run(self, container_id: str, bundle: Path, log_path: Path) -> int:
        """Creates and starts the container from ``bundle``; its stdout and stderr are appended
        to ``log_path``, size-capped and rotated (``services.nodeagent.logs``). Returns the host
        pid of its init."""

    @abc.abstractmethod
    async def state(self, container_id: str) -> ContainerState | None:
        """The container's state, or None if it does not exist."""

    @abc.abstractmethod
    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Signals the container's init; a container that is gone is not an error."""

    @abc.abstractmethod
    async def delete(self, container_id: str) -> None:
        """Force-deletes the container (killing it first if needed); idempotent."""

    @abc.abstractmethod
    async def pids(self, container_id: str) -> list[int]:
        """Host pids of every process in the container (init first), ``[]`` when it is gone."""

    @abc.abstractmethod
    async def list(self) -> list[ContainerState]:
        """Every container of this runtime whose id starts with ``prefix``."""
