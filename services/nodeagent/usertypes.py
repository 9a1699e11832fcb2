"""What starting a user image needs from two parts beside the nodeagent core, as interfaces.

    ImageSource  the node's digest-keyed image cache (``services/nodeagent/images``): pulls a
                 reference and returns the unpacked image with its OCI config
    Sandbox      the isolated container for a user image (``sandbox.RuncSandbox``): writes its
                 OCI bundle (user and network namespaces, seccomp, cgroups) and makes its server
                 reachable from the node (the per-instance ``forward.Forwarder``)

``userimage.py`` is written against these; the agent holds one of each (``NodeAgent.images``,
``NodeAgent.sandbox``), None on a node that runs only the built-in image. This module imports
nothing else from the package but the forwarder's ``Traffic`` record (a plain dataclass).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.nodeagent.forward import Traffic
from snapwake.v1 import nodeagent_pb2

__all__ = ["Image", "ImageConfig", "ImageSource", "Sandbox", "UserContainer"]


class ImageConfig(Protocol):
    """The parts of an image's OCI config a start reads."""

    @property
    def entrypoint(self) -> Sequence[str]: ...

    @property
    def cmd(self) -> Sequence[str]: ...

    @property
    def env(self) -> Sequence[str] | Mapping[str, str]:
        """``KEY=VALUE`` items as in the OCI config (or a mapping)."""
        ...

    @property
    def working_dir(self) -> str: ...

    @property
    def user(self) -> str: ...


class Image(Protocol):
    """One pulled and unpacked image."""

    @property
    def digest(self) -> str:
        """The manifest digest, ``sha256:...``: the same bytes on every node."""
        ...

    @property
    def rootfs(self) -> Path: ...

    @property
    def config(self) -> ImageConfig: ...

    @property
    def size_bytes(self) -> int: ...


class ImageSource(Protocol):
    async def pull(self, text: str, *, secret: str | None = None, timeout: float) -> Image:
        """The image ``text`` names (``snapwake.imageref`` syntax; a pinned one by digest),
        pulled with the operator-registered credential named ``secret``, from the cache when it
        holds that digest, and held for the caller (``release`` it). Raises
        ``InvalidArgument``/``NotFound`` for a reference no retry can pull, ``Unavailable`` or
        ``StartFailed`` otherwise, ``DeadlineExceeded`` past ``timeout`` seconds."""
        ...

    def release(self, digest: str) -> None:
        """One holder of a pulled image let go of it (it may be evicted once nobody holds it)."""
        ...


@dataclass(frozen=True)
class UserContainer:
    """Everything the sandbox needs to build one user-image container."""

    instance_id: str
    # The start request (spec: model dir, resources; placement: GPU index, memory slice).
    request: nodeagent_pb2.StartInstanceRequest
    image: Image
    # The command line (Entrypoint/Cmd after the spec's command/args), environment and cwd.
    args: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    user: str
    # The server listens on container_port inside the container's own network namespace; the
    # gateway reaches it at endpoint (the sandbox's ``listen``).
    container_port: int
    endpoint: str
    instance_dir: Path
    gpu: bool
    gpu_index: int


class Sandbox(Protocol):
    async def listen(self, instance_id: str, container_port: int) -> str:
        """Opens the instance's listener on the node; returns its endpoint (host:port), which
        carries connections to ``container_port`` in the container once it is ``expose``-d."""
        ...

    def bundle(self, container: UserContainer) -> Path:
        """Writes the container's OCI bundle under ``container.instance_dir``; returns its dir."""
        ...

    async def expose(self, container: UserContainer, pid: int) -> None:
        """Points the listener into the running container (init ``pid``), until ``release``."""
        ...

    async def release(self, instance_id: str) -> None:
        """Closes the listener (idempotent; the container is gone or going)."""
        ...

    def traffic(self, instance_id: str) -> Traffic | None:
        """What the instance's listener carries now (the node's RUNNING/IDLE signal for a user
        image); None when it has no listener."""
        ...
