"""The NodeAgentService gRPC servicer: thin; ``snapwake.grpcserver.ErrorInterceptor`` answers its domain errors."""

from __future__ import annotations

import grpc

from services.nodeagent import operations
from services.nodeagent.agent import NodeAgent
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc

__all__ = ["NodeAgentServicer", "SERVICE_NAME"]

SERVICE_NAME = nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgentService"].full_name


def _budget(context: grpc.aio.ServicerContext, default: float) -> float:
    """The caller's remaining deadline, or ``default`` when it set none."""
    remaining = context.time_remaining()
    return default if remaining is None else max(0.1, min(default, remaining))


class NodeAgentServicer(nodeagent_pb2_grpc.NodeAgentServiceServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def StartInstance(self, request: nodeagent_pb2.StartInstanceRequest,
                            context: grpc.aio.ServicerContext) -> nodeagent_pb2.StartInstanceResponse:
        instance = await operations.start_instance(self.agent, request)
        return nodeagent_pb2.StartInstanceResponse(instance=instance)

    async def RestoreInstance(self, request: nodeagent_pb2.RestoreInstanceRequest,
                              context: grpc.aio.ServicerContext) -> nodeagent_pb2.RestoreInstanceResponse:
        return await operations.restore_instance(self.agent, request, _budget(context, 60.0))

    async def SuspendInstance(self, request: nodeagent_pb2.SuspendInstanceRequest,
                              context: grpc.aio.ServicerContext) -> nodeagent_pb2.SuspendInstanceResponse:
        instance = await operations.suspend_instance(self.agent, request.instance_id, _budget(context, 60.0))
        return nodeagent_pb2.SuspendInstanceResponse(instance=instance)

    async def StopInstance(self, request: nodeagent_pb2.StopInstanceRequest,
                           context: grpc.aio.ServicerContext) -> nodeagent_pb2.StopInstanceResponse:
        await operations.stop_instance(self.agent, request.instance_id)
        return nodeagent_pb2.StopInstanceResponse()

    async def ListInstances(self, request: nodeagent_pb2.NodeAgentServiceListInstancesRequest,
                            context: grpc.aio.ServicerContext) -> nodeagent_pb2.NodeAgentServiceListInstancesResponse:
        return nodeagent_pb2.NodeAgentServiceListInstancesResponse(
            instances=[live.machine.instance for live in self.agent.instances.values()])

    async def GetInstanceLogs(self, request: nodeagent_pb2.NodeAgentServiceGetInstanceLogsRequest,
                              context: grpc.aio.ServicerContext) -> nodeagent_pb2.NodeAgentServiceGetInstanceLogsResponse:
        logs = operations.get_logs(self.agent, request.instance_id, request.tail_bytes)
        return nodeagent_pb2.NodeAgentServiceGetInstanceLogsResponse(logs=logs)
