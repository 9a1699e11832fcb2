"""The user-image sandbox of this nodeagent, behind ``usertypes.Sandbox``: the OCI bundle with
its own user and network namespaces, seccomp and cgroups, and the forwarder that makes the
server in the container's network namespace answer on a node port.

Both come from the byo-sandbox work (``services/nodeagent/container.py``); until it is merged
this adapter refuses, so a node runs only the built-in image and a user image's start fails
with a message saying why. Each call below is the one place that wiring goes.
"""

from __future__ import annotations

from pathlib import Path

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.usertypes import UserContainer
from snapwake import errors

__all__ = ["RuncSandbox"]


class RuncSandbox:
    """The sandbox for runc containers (``usertypes.Sandbox``)."""

    def __init__(self, config: NodeAgentConfig) -> None:
        self.config = config

    def bundle(self, container: UserContainer) -> Path:
        # wired when byo-sandbox lands:
        #   return write_bundle(container.instance_dir / "bundle", user_image_bundle_spec(self.config, container))
        raise errors.FailedPrecondition(f"node {self.config.name} cannot sandbox user images yet "
                                        "(the byo-sandbox bundle is not in this build)")

    async def expose(self, container: UserContainer, pid: int) -> None:
        # wired when byo-sandbox lands: the forwarder from 127.0.0.1:host_port on the node to
        # container_port in the network namespace of ``pid``.
        raise errors.FailedPrecondition(f"node {self.config.name} has no user-image forwarder yet")

    async def release(self, instance_id: str) -> None:
        # wired when byo-sandbox lands: stop the instance's forwarder.
        return None
