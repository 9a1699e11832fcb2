"""Container runtimes behind one interface: runc (real) and fake (plain subprocess, tests)."""

from services.nodeagent.runtime.base import ContainerRuntime, ContainerState, ContainerStatus
from services.nodeagent.runtime.fake import FakeRuntime
from services.nodeagent.runtime.runc import RuncRuntime

__all__ = ["ContainerRuntime", "ContainerState", "ContainerStatus", "FakeRuntime", "RuncRuntime"]
