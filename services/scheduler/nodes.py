"""Client for the nodeagents: one channel per address, a deadline on every call, and a failed
start told apart from a node that did not answer (``NodeUnreachable``). Calls go through
``snapwake.grpcclient.call``, so failures arrive as ``snapwake.errors``."""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from google.protobuf.duration_pb2 import Duration

from snapwake import errors
from snapwake.grpcclient import call, channel
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import nodeagent_pb2
from snapwake.v1.nodeagent_pb2_grpc import NodeAgentServiceStub
from snapwake.v1.types_pb2 import FunctionSpec, Instance, Node

__all__ = ["NodeClient", "NodeFull", "NodeUnreachable", "StartRefused"]

log = logging.getLogger(__name__)
# How long a node that did not answer is left out of placement. Its etcd keys expire with its
# lease (a few seconds) if it is dead; if it comes back, it is placed on again after this.
_UNREACHABLE_S = 10.0


class NodeUnreachable(errors.StartFailed):
    """The nodeagent did not answer at all (dead, or its keys not yet expired): nothing was
    started there, so the caller may place the instance elsewhere."""


class StartRefused(errors.StartFailed):
    """The node refused the start itself (a spec or image it cannot run: INVALID_ARGUMENT or
    NOT_FOUND): the same start would be refused again, so a deploy fails without retrying."""


class NodeFull(errors.StartFailed):
    """The node has no room for the instance now (RESOURCE_EXHAUSTED: its host memory holds no
    more whole-process standbys). Nothing failed, and nothing is left running for it (the node
    refused it first, or ended it, never FAILED); the same start may fit there once something
    on that node ends, so the caller waits a while before asking that node again."""


def _start_error(node: Node, what: str, err: errors.SnapwakeError) -> errors.StartFailed:
    # A start the node tried and failed comes back as StartFailed; a plain Unavailable means the
    # call never reached a working nodeagent. The message quotes the node's details as sent
    # (grpc_details keeps StartFailed's tag), as it always has.
    message = f"node {node.name}: {what}: {errors.grpc_details(err)}"
    if isinstance(err, errors.Unavailable):
        return NodeUnreachable(message)
    if isinstance(err, errors.InvalidArgument | errors.NotFound):
        return StartRefused(message)
    if isinstance(err, errors.ResourceExhausted):
        return NodeFull(message)
    return errors.StartFailed(message)


class NodeClient:
    """Calls ``NodeAgentService`` on ``Node.address``."""

    def __init__(self, rpc_timeout_s: float, tls: ClientTls | None = None) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unreachable: dict[str, float] = {}  # node name -> monotonic time it may be tried again

    def reachable(self, name: str) -> bool:
        """False for a while after a call to the node found no nodeagent answering."""
        return self._unreachable.get(name, 0.0) <= time.monotonic()

    def _mark(self, node: Node, err: errors.StartFailed) -> errors.StartFailed:
        if isinstance(err, NodeUnreachable):
            log.warning("node %s unreachable; not placing there for %.0fs", node.name, _UNREACHABLE_S)
            self._unreachable[node.name] = time.monotonic() + _UNREACHABLE_S
        return err

    def _stub(self, node: Node) -> NodeAgentServiceStub:
        if node.address not in self._channels:
            self._channels[node.address] = channel(node.address, self.tls, server_role="nodeagent")
        return NodeAgentServiceStub(self._channels[node.address])

    async def start(self, node: Node, instance_id: str, function_id: str, revision: int, spec: FunctionSpec,
                    target: int, gpu_index: int, timeout_s: float, image_digest: str = "") -> Instance:
        """Starts a container; raises ``StartFailed`` with the node's reason."""
        req = nodeagent_pb2.StartInstanceRequest(instance_id=instance_id, function_id=function_id, revision=revision,
                                      spec=spec, target=target, gpu_index=gpu_index,  # type: ignore[arg-type]
                                      gpu_memory_bytes=spec.resources.gpu_memory_bytes,
                                      timeout=Duration(seconds=int(timeout_s)), image_digest=image_digest)
        try:
            resp = await call(self._stub(node).StartInstance, req, timeout=timeout_s + self.rpc_timeout_s)
        except errors.SnapwakeError as exc:
            raise self._mark(node, _start_error(node, f"start of {instance_id}", exc)) from exc
        return resp.instance

    async def restore(self, node: Node, instance_id: str, gpu_index: int, timeout_s: float) -> Instance:
        """Standby to running; raises ``StartFailed`` with the node's reason."""
        try:
            resp = await call(self._stub(node).RestoreInstance,
                              nodeagent_pb2.RestoreInstanceRequest(instance_id=instance_id, gpu_index=gpu_index),
                              timeout=timeout_s + self.rpc_timeout_s)
        except errors.SnapwakeError as exc:
            raise self._mark(node, _start_error(node, f"restore of {instance_id}", exc)) from exc
        return resp.instance

    async def suspend(self, node: Node, instance_id: str) -> Instance:
        """Idle to standby: the node releases the GPU memory and checkpoints the context."""
        resp = await call(self._stub(node).SuspendInstance, nodeagent_pb2.SuspendInstanceRequest(instance_id=instance_id),
                          timeout=self.rpc_timeout_s * 6)
        return resp.instance

    async def stop(self, node: Node, instance_id: str) -> None:
        with contextlib.suppress(errors.NotFound):  # already gone
            await call(self._stub(node).StopInstance, nodeagent_pb2.StopInstanceRequest(instance_id=instance_id),
                       timeout=self.rpc_timeout_s * 4)

    async def logs(self, node: Node, instance_id: str, tail_bytes: int) -> str:
        resp = await call(self._stub(node).GetInstanceLogs,
                          nodeagent_pb2.NodeAgentServiceGetInstanceLogsRequest(instance_id=instance_id, tail_bytes=tail_bytes),
                          timeout=self.rpc_timeout_s)
        return resp.logs

    async def close(self) -> None:
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close()
        self._channels.clear()
