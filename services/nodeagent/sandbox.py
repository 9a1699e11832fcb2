"""The user-image sandbox of this nodeagent, behind ``usertypes.Sandbox``: the same sandbox every
instance container gets (``container.user_image_bundle_spec``: user and network namespaces,
seccomp, no capabilities, cgroup limits, the GPU's own device nodes), written by ``write_bundle``
with its private root dir under ``rootfs_dir``, and the per-instance ``Forwarder`` that carries
connections from the instance's endpoint into the container's network namespace.

The built-in model server's start (``operations.start_instance``) takes the same steps inline;
a user image goes through this seam so its flow (``userimage``) runs on FakeContainers in unit
tests with a sandbox that only writes the command line.
"""

from __future__ import annotations

from pathlib import Path

from services.nodeagent.bundle import write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import user_image_bundle_spec
from services.nodeagent.forward import Forwarder, NetNs, Traffic
from services.nodeagent.gpu import NodeGpus
from services.nodeagent.usertypes import UserContainer
from snapwake import errors

__all__ = ["RuncSandbox"]


class RuncSandbox:
    """The sandbox for runc containers (``usertypes.Sandbox``); ``isolates_network`` is the
    containers' (False only for FakeContainers, whose processes share the host's namespace)."""

    def __init__(self, config: NodeAgentConfig, node_gpus: NodeGpus, isolates_network: bool = True) -> None:
        self.config, self.node_gpus, self.isolates_network = config, node_gpus, isolates_network
        self._forwarders: dict[str, Forwarder] = {}

    async def listen(self, instance_id: str, container_port: int) -> str:
        try:
            forwarder = Forwarder(self.config.instance_host, container_port, self.config.forward_idle_timeout)
        except OSError as exc:
            raise errors.Unavailable(f"cannot listen for the instance on {self.config.instance_host}: {exc}") from exc
        self._forwarders[instance_id] = forwarder
        await forwarder.start()
        return forwarder.endpoint

    def bundle(self, container: UserContainer) -> Path:
        gpu = self.node_gpus.access(container.gpu_index) if container.gpu else None
        spec = user_image_bundle_spec(self.config, container.request, container.image.rootfs, container.image.config,
                                      container.args, container.env, container.container_port,
                                      container.instance_dir, gpu)
        return write_bundle(container.instance_dir / "bundle", spec, self.config.rootfs_base / container.instance_id)

    async def expose(self, container: UserContainer, pid: int) -> None:
        forwarder = self._forwarders.get(container.instance_id)
        if forwarder is None:
            raise errors.StartFailed(f"{container.instance_id} has no listener (released)")
        try:
            forwarder.attach(NetNs.of_pid(pid, own=self.isolates_network))
        except OSError as exc:
            raise errors.StartFailed(f"cannot reach the container's network namespace: {exc}") from exc

    async def release(self, instance_id: str) -> None:
        forwarder = self._forwarders.pop(instance_id, None)
        if forwarder is not None:
            await forwarder.close()

    def traffic(self, instance_id: str) -> Traffic | None:
        forwarder = self._forwarders.get(instance_id)
        return None if forwarder is None else forwarder.traffic()
