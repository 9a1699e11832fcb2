"""Assembles a running nodeagent from its config: etcd, runtime, GPUs, the agent, gRPC."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.nodeagent.agent import NodeAgent
from services.nodeagent.api import SERVICE_NAME, NodeAgentServicer
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.gpu import (
    Checkpointer,
    CudaCheckpointer,
    NoGpuCheckpointer,
    discover,
    host_memory_bytes,
)
from services.nodeagent.runtime import ContainerRuntime, FakeRuntime, RuncRuntime
from snapwake.grpcserver import GrpcServer
from snapwake.store import Store
from snapwake.v1 import nodeagent_pb2_grpc

__all__ = ["Running", "serve"]

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A started nodeagent: its agent and bound gRPC port."""

    agent: NodeAgent
    grpc: GrpcServer

    @property
    def port(self) -> int:
        return self.grpc.port


def _runtime(config: NodeAgentConfig) -> ContainerRuntime:
    if config.runtime == "fake":
        return FakeRuntime()
    return RuncRuntime(config.runc_root, binary=config.runc_binary)


def _checkpointer(has_gpu: bool) -> Checkpointer:
    return CudaCheckpointer() if has_gpu else NoGpuCheckpointer()


@contextlib.asynccontextmanager
async def serve(config: NodeAgentConfig) -> AsyncIterator[Running]:
    """Runs the nodeagent until the context exits, then stops containers and revokes the lease."""
    gpus = discover() if config.gpus == "auto" else []
    Path(config.handover_socket).parent.mkdir(parents=True, exist_ok=True)
    async with Store.connect(config.etcd) as store:
        agent = NodeAgent(config, store, _runtime(config), _checkpointer(bool(gpus)), gpus, host_memory_bytes())
        server = GrpcServer(config.listen, [SERVICE_NAME])
        nodeagent_pb2_grpc.add_NodeAgentServiceServicer_to_server(NodeAgentServicer(agent), server.server)
        await agent.start()
        try:
            await server.start()
            log.info("nodeagent %s serving on port %d", config.name, server.port)
            yield Running(agent, server)
        finally:
            await server.stop(grace=2.0)
            await agent.stop()
