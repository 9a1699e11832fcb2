"""Container runtimes behind one interface: runc (real) and fake (plain subprocess, tests)."""

from services.nodeagent.containers.base import Containers, ContainerState, ContainerStatus
from services.nodeagent.containers.fake import FakeContainers
from services.nodeagent.containers.runc import RuncContainers

__all__ = ["Containers", "ContainerState", "ContainerStatus", "FakeContainers", "RuncContainers"]
