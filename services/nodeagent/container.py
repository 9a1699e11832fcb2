"""What one instance's container looks like: its model server command line, env and mounts."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from services.nodeagent.bundle import BundleSpec, host_layout, modelserver_args
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.handover import socket_path
from services.nodeagent.machine import StartPlan, modelserver_start_mode
from services.nodeagent.process_mode import is_process as process_mode
from snapwake import errors, keys
from snapwake.v1 import nodeagent_pb2

__all__ = ["bundle_spec", "free_port", "python_dirs"]


def free_port(taken: set[int], attempts: int = 20) -> int:
    """A loopback port nobody listens on and no other instance of ours was given."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port
    raise errors.ResourceExhausted("no free loopback port for the instance")


def python_dirs(python: str) -> tuple[str, ...]:
    """Directories a container needs to run ``python``: its venv (if any) and the base
    installation behind the symlinks, plus this process's own prefixes."""
    exe = Path(python)
    dirs = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
            str(Path(os.path.realpath(exe)).parent.parent)}
    if (exe.parent.parent / "pyvenv.cfg").exists():
        dirs.add(os.path.realpath(exe.parent.parent))
    return tuple(sorted(dirs))


def bundle_spec(config: NodeAgentConfig, req: nodeagent_pb2.StartInstanceRequest, plan: StartPlan,
                port: int, instance_dir: Path, use_gpu: bool) -> BundleSpec:
    """The container for a built-in model server instance (see docs/CONTRACTS.md, Node layout)."""
    spec = req.spec
    control = str(instance_dir / "control.sock")
    handover = str(socket_path(instance_dir))  # its own socket (services/nodeagent/handover.py)
    args = modelserver_args(
        config.python, model_dir=os.path.realpath(spec.model_dir), port=port,
        device="cuda" if use_gpu else "cpu", gpu_index=req.gpu_index,
        gpu_memory_bytes=req.gpu_memory_bytes or spec.resources.gpu_memory_bytes,
        start_mode=modelserver_start_mode(plan, process_mode(spec)), control_socket=control,
        handover_socket=handover,
        snapshot_id=keys.snapshot_id(req.function_id, req.revision), sample_request=spec.sample_request)
    env = {**dict(spec.env), "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": ":".join([*config.python_path, config.repo_root]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "SNAPWAKE_CONTROL_SOCKET": control,
           "SNAPWAKE_HANDOVER_SOCKET": handover,
           **dict(item.split("=", 1) for item in config.container_env)}
    system, links = host_layout()
    return BundleSpec(
        args=args, env=env, cwd=str(instance_dir), hostname=req.instance_id,
        ro_binds=(*system, *python_dirs(config.python), os.path.realpath(config.repo_root),
                  *(os.path.realpath(p) for p in config.python_path),
                  os.path.realpath(spec.model_dir)),
        rw_binds=(str(instance_dir),), symlinks=links, gpu=use_gpu)
