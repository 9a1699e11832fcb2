"""Assembles a running nodeagent from its config: etcd, containers, GPUs, the agent, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import REGISTRY

from services.nodeagent.agent import NodeAgent
from services.nodeagent.api import SERVICE_NAME, NodeAgentServicer
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.containers import Containers, FakeContainers, RuncContainers
from services.nodeagent.gpu import (
    Checkpointer,
    CudaCheckpointer,
    NodeGpus,
    NoGpuCheckpointer,
    device_minors,
    devices,
    discover,
    host_memory_bytes,
)
from services.nodeagent.images import ImageCache
from services.nodeagent.modelmetrics import ModelServerMetrics
from services.nodeagent.sandbox import RuncSandbox
from snapwake import errors
from snapwake.etcd import Etcd, EtcdTls
from snapwake.grpcserver import GrpcServer
from snapwake.pki import Identity, identity_from_pem
from snapwake.v1 import nodeagent_pb2_grpc, types_pb2

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


def _etcd_tls(config: NodeAgentConfig) -> EtcdTls | None:
    """The etcd client certificate, which must be this node's: etcd lets the user it names write
    only its own node key (``snapwake.etcdauth``)."""
    tls = EtcdTls.from_config(config)
    if tls is not None:
        try:
            found = identity_from_pem(Path(tls.cert).read_bytes())
        except OSError:
            return tls  # EtcdTls names the unreadable file
        if found != Identity("nodeagent", config.name):
            raise errors.InvalidArgument(f"etcd_cert: {tls.cert} is the certificate of {found or 'no identity'}, "
                                         f"not of nodeagent/{config.name}", field="etcd_cert")
    return tls


def _containers(config: NodeAgentConfig) -> Containers:
    if config.containers == "fake":
        return FakeContainers(log_max_bytes=config.log_max_bytes)
    return RuncContainers(config.runc_root, binary=config.runc_binary, log_max_bytes=config.log_max_bytes)


def _checkpointer(has_gpu: bool) -> Checkpointer:
    return CudaCheckpointer() if has_gpu else NoGpuCheckpointer()


def _node_gpus(config: NodeAgentConfig, gpus: list[types_pb2.Gpu]) -> NodeGpus:
    """The device nodes and driver files of the GPUs in use; a GPU without them stops the start."""
    if not gpus:
        return NodeGpus()
    minors = device_minors()
    try:
        return devices.discover({g.index: minors[g.index] for g in gpus}, config.driver_lib_dir)
    except (OSError, KeyError, ValueError) as exc:
        raise errors.Unavailable(f"GPU device nodes or driver files not found: {exc}") from exc


def _image_cache(config: NodeAgentConfig) -> ImageCache:
    """The node's image cache. Its rootfs files belong to the containers' mapped ids
    (``id_base`` is the sandbox's ``userns_base``), and the sandbox binds each rootfs's entries
    read-only, so the dirs above the cache need no access for those ids."""
    root = config.image_root
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    secrets = Path(config.image_secrets_dir) if config.image_secrets_dir else None
    return ImageCache(root, config.image_cache_max_bytes, secrets, id_base=config.userns_base,
                      local_roots=[Path(p) for p in config.image_local_roots])


@contextlib.asynccontextmanager
async def serve(config: NodeAgentConfig) -> AsyncIterator[Running]:
    """Runs the nodeagent until the context exits, then stops containers and revokes the lease."""
    gpus = discover() if config.gpus == "auto" else []
    node_gpus = _node_gpus(config, gpus)
    Path(config.handover_socket).parent.mkdir(parents=True, exist_ok=True)
    async with Etcd.connect(config.etcd, tls=_etcd_tls(config)) as etcd:
        containers = _containers(config)
        images = await asyncio.to_thread(_image_cache, config)  # reads its index from disk
        agent = NodeAgent(config, etcd, containers, _checkpointer(bool(gpus)), gpus, host_memory_bytes(),
                          node_gpus=node_gpus, images=images,
                          sandbox=RuncSandbox(config, node_gpus, containers.isolates_network))
        tls = config.server_tls()
        if tls and tls.identity.name != config.name:
            # One Secret for every node of a DaemonSet gives them one identity: the per-node
            # rule (snapwake.authz) then cannot tell this node's blobstore from another's.
            log.warning("certificate identity %s does not name this node %s", tls.identity, config.name)
        server = GrpcServer(config.listen, [SERVICE_NAME], tls=tls, health_bind=config.health_listen)
        nodeagent_pb2_grpc.add_NodeAgentServiceServicer_to_server(NodeAgentServicer(agent), server.server)
        await agent.start()
        relay, cold_registered = None, False
        if config.metrics_port:  # the model servers' metrics, scraped through the node's /metrics
            relay = ModelServerMetrics(lambda: [live.machine.instance for live in list(agent.instances.values())
                                                if not live.user_image])
            REGISTRY.register(relay)
            try:  # the cold-standby tier's (coldstandby); one node's per process
                REGISTRY.register(agent.cold_metrics.registry)
                cold_registered = True
            except ValueError as exc:
                log.warning("cold-standby metrics not served: %s", exc)
        try:
            await server.start()
            log.info("nodeagent %s serving on port %d", config.name, server.port)
            yield Running(agent, server)
        finally:
            if relay is not None:
                REGISTRY.unregister(relay)
            if cold_registered:
                REGISTRY.unregister(agent.cold_metrics.registry)
            await server.stop(grace=2.0)
            await agent.stop()
            await images.close()
