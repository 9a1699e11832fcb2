"""What the scheduler asks of nodeagents, as one small interface.

``NodeClient`` (``nodes.py``) makes these calls over gRPC; ``FakeNodeClient`` (``nodes_fake.py``)
answers them in memory for unit tests of the scheduler core.
"""

from __future__ import annotations

from typing import Protocol

from snapwake.v1.types_pb2 import FunctionSpec, Instance, Node

__all__ = ["Nodes"]


class Nodes(Protocol):
    """Calls to the nodeagent on ``Node.address``. Starts and restores raise ``StartFailed``
    (``NodeUnreachable`` when no nodeagent answered, so nothing started there; ``StartRefused``
    when the node refused the spec or image itself, so retrying cannot help)."""

    def reachable(self, name: str) -> bool:
        """False for a while after a call found no nodeagent answering on that node."""

    async def start(self, node: Node, instance_id: str, function_id: str, revision: int, spec: FunctionSpec,
                    target: int, gpu_index: int, timeout_s: float, image_digest: str = "") -> Instance:
        """Starts a container toward ``target`` (a ``StartTarget``) and returns once it got there;
        a user image runs at ``image_digest`` when given (the revision's pinned digest)."""

    async def restore(self, node: Node, instance_id: str, gpu_index: int, timeout_s: float) -> Instance:
        """Standby to running."""

    async def suspend(self, node: Node, instance_id: str) -> Instance:
        """Idle to standby."""

    async def stop(self, node: Node, instance_id: str) -> None:
        """Stops the instance; one the node does not know is not an error."""

    async def logs(self, node: Node, instance_id: str, tail_bytes: int) -> str:
        """The tail of the instance's output."""

    async def close(self) -> None:
        """Closes the channels."""
