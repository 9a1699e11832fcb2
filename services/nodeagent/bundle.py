"""OCI bundles for instance containers.

The rootfs is an empty directory; the host's system directories and the Python environment
are bound into it read-only at the same paths, so the model server runs exactly the code and
interpreter the host has (the "builtin" image). Only the instance directory is writable.
The container shares the host network (the nodeagent picks a loopback port), but has its own
pid, ipc, uts and mount namespaces. ``build_config`` is pure; ``write_bundle`` does the I/O.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleSpec", "SYSTEM_DIRS", "build_config", "host_layout", "modelserver_args", "write_bundle"]

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
         "CAP_NET_BIND_SERVICE"]


@dataclass(frozen=True)
class BundleSpec:
    """Everything that goes into one container's config.json."""

    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    hostname: str
    # Host paths bound read-only / read-write at the same path inside the container.
    ro_binds: tuple[str, ...] = ()
    rw_binds: tuple[str, ...] = ()
    # (name, target) symlinks created in the rootfs, for system dirs that are links (/bin -> usr/bin).
    symlinks: tuple[tuple[str, str], ...] = ()
    # GPUs used: bind the host's /dev (the NVIDIA device nodes) instead of a minimal /dev.
    gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def modelserver_args(python: str, *, model_dir: str, port: int, device: str, gpu_index: int,
                 gpu_memory_bytes: int, start_mode: str, control_socket: str, handover_socket: str,
                 snapshot_id: str = "", sample_request: str = "") -> tuple[str, ...]:
    """The model server's command line, as pinned in docs/CONTRACTS.md."""
    args = [python, "-m", "modelserver", "--model-dir", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--device", device, "--gpu-index", str(gpu_index), "--gpu-memory-bytes", str(gpu_memory_bytes),
            "--start-mode", start_mode, "--control-socket", control_socket,
            "--handover-socket", handover_socket]
    if snapshot_id:
        args += ["--snapshot-id", snapshot_id]
    if sample_request:
        args += ["--sample-request", sample_request]
    return tuple(args)


def _covered(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def _binds(spec: BundleSpec) -> list[dict[str, Any]]:
    """Bind mounts, de-duplicated (a read-only path inside another read-only bind is skipped)
    and ordered parents first so a nested read-write bind lands on top of its parent."""
    ro: list[str] = []
    for path in sorted(set(spec.ro_binds), key=len):
        if not _covered(path, ro):
            ro.append(path)
    mounts = [(p, "ro") for p in ro] + [(p, "rw") for p in sorted(set(spec.rw_binds))]
    mounts.sort(key=lambda m: (m[0].rstrip("/").count("/"), m[0]))
    return [{"destination": p, "type": "bind", "source": p, "options": ["rbind", mode, "nosuid"]}
            for p, mode in mounts]


def build_config(spec: BundleSpec) -> dict[str, Any]:
    """The OCI runtime config (config.json) for ``spec``."""
    if spec.gpu:
        dev = [{"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind", "rw", "nosuid"]}]
    else:
        dev = [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
               {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
               {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=1g"]}]
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"}, *dev,
              {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid"]},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", "size=1g"]},
              *_binds(spec)]
    linux: dict[str, Any] = {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                             "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                             "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"]}
    if spec.gpu:  # the NVIDIA device nodes are created by the driver with dynamic minors
        linux["resources"] = {"devices": [{"allow": True, "access": "rwm"}]}
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": spec.cwd,
                    "args": list(spec.args), "env": [f"{k}={v}" for k, v in sorted(spec.env.items())],
                    "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": linux,
        **spec.extra,
    }


def host_layout(dirs: tuple[str, ...] = SYSTEM_DIRS) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Splits the host's system dirs into real directories (to bind) and symlinks (to recreate)."""
    binds, links = [], []
    for d in dirs:
        if os.path.islink(d):
            links.append((d.lstrip("/"), os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(d)
    return tuple(binds), tuple(links)


def write_bundle(bundle_dir: Path, spec: BundleSpec) -> Path:
    """Writes ``bundle_dir/config.json`` and the empty rootfs with its symlinks."""
    rootfs = bundle_dir / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    for name, target in spec.symlinks:
        link = rootfs / name
        if not link.is_symlink():
            link.symlink_to(target)
    (bundle_dir / "config.json").write_text(json.dumps(build_config(spec), indent=1))
    return bundle_dir
