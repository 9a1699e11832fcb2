"""What one instance's container looks like: the built-in model server's or a user image's
(command line, env, root, mounts, limits), both in the sandbox of ``bundle.py``.

An instance dir holds ``bundle/`` and ``output.log`` (host root's: the container never sees
them) and, for the built-in model server, ``work/``: its only writable host dir (owned by the
container's root, bound read-write; its cwd and control socket).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict
from urllib.parse import urlsplit

from services.nodeagent import seccomp
from services.nodeagent.bundle import OWN_PATHS, BundleSpec, IdMap, Limits, host_layout, modelserver_args
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.gpu.devices import GpuAccess
from services.nodeagent.handover import socket_path
from services.nodeagent.machine import StartPlan, modelserver_start_mode
from services.nodeagent.process_mode import is_process as process_mode
from services.nodeagent.users import resolve_user
from snapwake import errors, keys
from snapwake.v1 import nodeagent_pb2, types_pb2

__all__ = ["MODEL_DIR", "OTLP_SOCKET", "ImageConfigLike", "bundle_spec", "otlp_env", "otlp_relay_target", "cgroup_path", "container_limits",
           "control_socket", "free_port", "image_layout", "make_work_dir", "python_dirs", "user_image_bundle_spec", "work_dir"]

# Where a user image finds the spec's model dir (a dir of our own rootfs: never inside the image's).
MODEL_DIR = "/snapwake/model"
_RESERVED = {*(p.lstrip("/") for p in OWN_PATHS), "snapwake"}
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageConfigLike(Protocol):
    """The parts of an image's config a container is built from (``images.ImageConfig``; read
    only, so a frozen dataclass fits). ``env`` is a mapping or OCI's ``KEY=VALUE`` strings."""

    @property
    def entrypoint(self) -> Sequence[str]: ...
    @property
    def cmd(self) -> Sequence[str]: ...
    @property
    def env(self) -> Mapping[str, str] | Sequence[str]: ...
    @property
    def working_dir(self) -> str: ...
    @property
    def user(self) -> str: ...


def free_port(taken: set[int], attempts: int = 20) -> int:
    """A loopback port nobody listens on and no other instance of ours was given."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port
    raise errors.ResourceExhausted("no free loopback port for the instance")


def work_dir(instance_dir: Path) -> Path:
    """The built-in model server's writable dir (its cwd)."""
    return instance_dir / "work"


def control_socket(instance_dir: Path) -> Path:
    return work_dir(instance_dir) / "control.sock"


def make_work_dir(instance_dir: Path, id_map: IdMap) -> Path:
    """Creates the work dir, owned by the container's root."""
    path = work_dir(instance_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, id_map.host(0), id_map.host(0))
    return path


def cgroup_path(config: NodeAgentConfig, instance_id: str) -> str:
    return f"/{config.cgroup_parent}/{instance_id}"


def python_dirs(python: str) -> tuple[str, ...]:
    """Directories a container needs to run ``python``: its venv (if any) and the base
    installation behind the symlinks, plus this process's own prefixes."""
    exe = Path(python)
    dirs = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
            str(Path(os.path.realpath(exe)).parent.parent)}
    if (exe.parent.parent / "pyvenv.cfg").exists():
        dirs.add(os.path.realpath(exe.parent.parent))
    return tuple(sorted(dirs))


def container_limits(config: NodeAgentConfig, spec: types_pb2.FunctionSpec, gpu: bool) -> Limits:
    """Memory, CPU, pids and tmpfs limits of an instance of ``spec``."""
    res = spec.resources
    memory = res.host_memory_bytes or config.default_memory_bytes
    if gpu and process_mode(spec):  # the driver checkpoint parks the GPU state in the process's memory
        memory += res.gpu_memory_bytes
    # The cold-standby tier pages a parked standby out to swap: its cgroup must allow as much
    # swap as it may hold in memory (``coldstandby``).
    swap = memory if config.cold_standby_after_s > 0 else 0
    return Limits(memory_bytes=memory, cpu_millis=res.cpu_millis or config.default_cpu_millis,
                  pids=config.pids_limit, tmp_bytes=config.tmp_bytes, swap_bytes=swap)


def _etc(hostname: str) -> tuple[tuple[str, str], ...]:
    """A minimal /etc for the built-in model server (never the host's)."""
    return (("etc/passwd", "root:x:0:0:root:/tmp:/usr/sbin/nologin\n"
                           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
            ("etc/hostname", hostname + "\n"),
            ("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
            ("etc/resolv.conf", "# no DNS: the container's network has only loopback\n"))


class _Sandbox(TypedDict):
    """The BundleSpec fields every instance container shares."""

    hostname: str
    id_map: IdMap
    limits: Limits
    devices: tuple[Any, ...]
    seccomp: dict[str, Any]
    cgroup_path: str


def _sandbox(config: NodeAgentConfig, req: nodeagent_pb2.StartInstanceRequest, gpu: GpuAccess | None) -> _Sandbox:
    return {"hostname": req.instance_id, "id_map": IdMap(config.userns_base, config.userns_size),
            "limits": container_limits(config, req.spec, gpu is not None),
            "devices": gpu.devices if gpu else (), "seccomp": seccomp.load(config.seccomp_profile),
            "cgroup_path": cgroup_path(config, req.instance_id)}


# The model server's traces leave its network namespace only through this socket in its
# instance dir (``forward.TelemetryRelay`` splices it to the node's collector).
OTLP_SOCKET = "otlp.sock"


def otlp_relay_target(env: Mapping[str, str]) -> tuple[str, int] | None:
    """The collector ``(host, port)`` that the containers' OTLP/gRPC exporter is told to dial
    (``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``, plain ``http://`` or no scheme), or None when
    there is none to relay (no endpoint, another protocol, or TLS, which a relay cannot carry
    under the collector's name)."""
    if env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc") != "grpc":
        return None
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not raw:
        return None
    url = urlsplit(raw if "://" in raw else "http://" + raw)
    try:
        port = url.port
    except ValueError:
        return None
    if url.scheme != "http" or not url.hostname or not port:
        return None
    return url.hostname, port


def otlp_env(instance_dir: Path) -> dict[str, str]:
    """The exporter settings that send a container's traces through its relay socket."""
    endpoint = f"unix://{instance_dir / OTLP_SOCKET}"
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true"}


def bundle_spec(config: NodeAgentConfig, req: nodeagent_pb2.StartInstanceRequest, plan: StartPlan,
                port: int, instance_dir: Path, gpu: GpuAccess | None) -> BundleSpec:
    """The container for a built-in model server instance (see docs/CONTRACTS.md, Node layout).
    ``req.spec.model_dir`` must have passed ``spec_checks.resolve_model_dir``."""
    spec = req.spec
    control = str(control_socket(instance_dir))
    handover = str(socket_path(instance_dir))  # its own socket (services/nodeagent/handover.py)
    args = modelserver_args(
        config.python, model_dir=os.path.realpath(spec.model_dir), port=port,
        device="cuda" if gpu else "cpu", gpu_index=req.gpu_index,
        gpu_memory_bytes=req.gpu_memory_bytes or spec.resources.gpu_memory_bytes,
        start_mode=modelserver_start_mode(plan, process_mode(spec)), control_socket=control,
        handover_socket=handover,
        snapshot_id=keys.snapshot_id(req.function_id, req.revision), sample_request=spec.sample_request,
        cuda_device=0 if gpu else -1, chat_template=spec.chat_template)
    env = {**dict(spec.env), "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": ":".join([*config.python_path, config.repo_root]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "SNAPWAKE_CONTROL_SOCKET": control,
           "SNAPWAKE_HANDOVER_SOCKET": handover, **(gpu.env if gpu else {}),
           **dict(item.split("=", 1) for item in config.container_env)}
    if otlp_relay_target(env) is not None:
        env.update(otlp_env(instance_dir))
    system, links = host_layout()
    # The instance dir read-only for its handover socket (the dir, not the socket: a restarted
    # blobstore makes a new inode), with work/ read-write on top.
    return BundleSpec(
        args=args, env=env, cwd=str(work_dir(instance_dir)),
        ro_binds=(*system, *python_dirs(config.python), os.path.realpath(config.repo_root),
                  *(os.path.realpath(p) for p in config.python_path),
                  os.path.realpath(spec.model_dir), str(instance_dir)),
        rw_binds=(str(work_dir(instance_dir)),), symlinks=(*links, *(gpu.symlinks if gpu else ())),
        ro_mounts=gpu.mounts if gpu else (), files=_etc(req.instance_id), **_sandbox(config, req, gpu))


def image_layout(rootfs: Path) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(ro mounts, symlinks) that rebuild an image's top level in a private rootfs: each
    directory and file bound read-only, each symlink recreated; names the sandbox provides
    itself (proc, dev, sys, tmp, snapwake) are left out. Nothing is ever written into the image."""
    mounts, links = [], []
    for entry in sorted(os.scandir(rootfs), key=lambda e: e.name):
        if entry.name in _RESERVED:
            continue
        if entry.is_symlink():
            links.append((entry.name, os.readlink(entry.path)))
        elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
            mounts.append(("/" + entry.name, entry.path))
    return tuple(mounts), tuple(links)


def _image_env(image_env: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(image_env, Mapping):
        return dict(image_env)
    return dict(item.split("=", 1) for item in image_env if "=" in item)


def user_image_bundle_spec(config: NodeAgentConfig, req: nodeagent_pb2.StartInstanceRequest, image_rootfs: Path,
                           image_config: ImageConfigLike, command: Sequence[str], env: Mapping[str, str],
                           port: int, instance_dir: Path, gpu: GpuAccess | None) -> BundleSpec:
    """The container for a user image: the image's rootfs as a read-only root, its process as
    its config says (``command``, when given, replaces entrypoint and cmd; ``env`` goes over
    the image's), listening on ``port`` inside its own network namespace. No host /usr, /etc or
    Python environment; with a GPU, the driver's files as the NVIDIA toolkit gives them. The
    spec's model dir, if any, is at ``MODEL_DIR``. ``instance_dir`` is not bound: the process's
    writable space is /tmp. InvalidArgument when the image cannot be run as configured."""
    del instance_dir  # nothing of it goes into a user image's container; kept for a uniform call
    args = tuple(command) or (*image_config.entrypoint, *image_config.cmd)
    if not args:
        raise errors.InvalidArgument("spec.command: empty, and the image has no entrypoint or cmd",
                                     field="spec.command")
    id_map = IdMap(config.userns_base, config.userns_size)
    user = resolve_user(image_rootfs, image_config.user, id_map.size)
    merged = {"PATH": _PATH, "HOME": user.home, "HOSTNAME": req.instance_id, "PORT": str(port),
              **_image_env(image_config.env), **dict(env)}
    mounts, links = image_layout(image_rootfs)
    model = os.path.realpath(req.spec.model_dir) if req.spec.model_dir else ""
    if model:
        mounts, merged["SNAPWAKE_MODEL_DIR"] = (*mounts, (MODEL_DIR, model)), MODEL_DIR
    if gpu:
        lib_path = merged.get("LD_LIBRARY_PATH")
        merged.update(gpu.env)
        if lib_path:  # the node's driver first: it must match the kernel module
            merged["LD_LIBRARY_PATH"] = f"{gpu.env['LD_LIBRARY_PATH']}:{lib_path}"
    return BundleSpec(
        args=args, env=merged, cwd=image_config.working_dir or "/", ro_mounts=(*mounts, *(gpu.mounts if gpu else ())),
        symlinks=(*links, *(gpu.symlinks if gpu else ())), user=(user.uid, user.gid), groups=user.groups,
        **_sandbox(config, req, gpu))
