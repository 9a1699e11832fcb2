"""OCI bundles for instance containers: every container runs in the same sandbox.

The sandbox (docs/CONTRACTS.md, Node layout and sandbox):

- a user namespace: container ids 0..size-1 are host ids base..base+size-1, so the container's
  root is an unprivileged host user; no capability in any set; ``noNewPrivileges``;
- its own network namespace with only loopback (the nodeagent's forwarder is the way in), and
  its own pid, ipc, uts, mount and cgroup namespaces;
- a read-only root assembled in the bundle's private ``rootfs``: read-only binds of a source
  root's top-level entries (the host's system dirs for the built-in model server, an image's
  rootfs for a user image) plus small generated files, so nothing is ever created inside the
  source; a private size-bounded ``/tmp`` and ``/dev/shm``; its own ``/dev`` with only the
  default nodes and the GPU nodes it was given; a fresh read-only sysfs; runc's masked and
  read-only ``/proc`` paths;
- cgroup limits (memory, CPU quota, pids) and a device cgroup that denies everything but the
  given nodes (runc adds its default null/zero/full/tty/random/urandom/ptmx);
- the seccomp filter it is given (``seccomp.py``).

``build_config`` is pure; ``write_bundle`` does the I/O.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleSpec", "Device", "IdMap", "Limits", "SYSTEM_DIRS", "build_config", "host_layout",
           "modelserver_args", "write_bundle"]

# The host dirs the built-in model server's root is made of (never /etc: see ``builtin_etc``).
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
# Paths the sandbox itself provides; a source root's entries of these names are not bound.
OWN_PATHS = ("/proc", "/dev", "/sys", "/tmp")
# runc's defaults (``runc spec``).
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_CPU_PERIOD_US = 100_000
# Under host memory pressure the kernel kills a container before the services of the node.
_OOM_SCORE_ADJ = 500


@dataclass(frozen=True)
class IdMap:
    """Container uids and gids 0..size-1 are host ids base..base+size-1."""

    base: int = 100_000
    size: int = 65_536

    def host(self, container_id: int) -> int:
        """The host id of ``container_id``."""
        return self.base + container_id


@dataclass(frozen=True)
class Device:
    """A device node created in the container's /dev and allowed (rw) in its device cgroup."""

    path: str
    major: int
    minor: int
    # Permission bits of the node (the NVIDIA driver makes its nodes 0666).
    mode: int = 0o666


@dataclass(frozen=True)
class Limits:
    """Cgroup and tmpfs limits; 0 means no limit of that kind."""

    memory_bytes: int = 0
    # Millicores: 1000 is one CPU's time per period, enforced as a CFS quota.
    cpu_millis: int = 0
    pids: int = 0
    # Size of /tmp and of /dev/shm (each); their pages are charged to the memory limit too.
    tmp_bytes: int = 256 << 20
    # Swap the container may use beside memory_bytes (cgroup v2 memory.swap.max); 0 leaves
    # runc's default (the cold-standby tier sets it: ``coldstandby``).
    swap_bytes: int = 0


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
    # (name, target) symlinks created in the rootfs, for system dirs that are links (/bin -> usr/bin);
    # a name may be nested (snapwake/driver/libcuda.so.1).
    symlinks: tuple[tuple[str, str], ...] = ()
    # (container path, host path) read-only binds elsewhere than at the same path: the root's
    # top-level entries of an image, the GPU driver's files.
    ro_mounts: tuple[tuple[str, str], ...] = ()
    # (path in the rootfs, text) small files written into the private rootfs (a generated /etc).
    files: tuple[tuple[str, str], ...] = ()
    # The process's uid and gid inside the user namespace, and its supplementary gids.
    user: tuple[int, int] = (0, 0)
    groups: tuple[int, ...] = ()
    id_map: IdMap = IdMap()
    limits: Limits = Limits()
    # The GPU's nodes and the driver's control nodes; none on CPU.
    devices: tuple[Device, ...] = ()
    # The OCI linux.seccomp object (``seccomp.load``); None runs without a filter (tests only).
    seccomp: dict[str, Any] | None = None
    # Absolute cgroup path under each controller's root ("" lets runc choose).
    cgroup_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        """Whether the container was given GPU device nodes."""
        return bool(self.devices)


def modelserver_args(python: str, *, model_dir: str, port: int, device: str, gpu_index: int,
                 gpu_memory_bytes: int, start_mode: str, control_socket: str, handover_socket: str,
                 snapshot_id: str = "", sample_request: str = "", cuda_device: int = -1,
                 chat_template: str = "") -> tuple[str, ...]:
    """The model server's command line, as pinned in docs/CONTRACTS.md."""
    args = [python, "-m", "modelserver", "--model-dir", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--device", device, "--gpu-index", str(gpu_index), "--gpu-memory-bytes", str(gpu_memory_bytes),
            "--start-mode", start_mode, "--control-socket", control_socket,
            "--handover-socket", handover_socket]
    if snapshot_id:
        args += ["--snapshot-id", snapshot_id]
    if sample_request:
        args += ["--sample-request", sample_request]
    if cuda_device >= 0:
        args += ["--cuda-device", str(cuda_device)]
    if chat_template:
        args += ["--chat-template", chat_template]
    return tuple(args)


def _covered(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def _bind(dest: str, source: str, mode: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": source, "options": ["rbind", mode, "nosuid", "nodev"]}


def _binds(spec: BundleSpec) -> list[dict[str, Any]]:
    """Bind mounts, de-duplicated (a read-only path inside another read-only bind is skipped)
    and ordered parents first so a nested read-write bind lands on top of its parent."""
    ro: list[str] = []
    for path in sorted(set(spec.ro_binds), key=len):
        if not _covered(path, ro):
            ro.append(path)
    mounts = [(p, p, "ro") for p in ro] + [(d, s, "ro") for d, s in spec.ro_mounts]
    mounts += [(p, p, "rw") for p in sorted(set(spec.rw_binds))]
    mounts.sort(key=lambda m: (m[0].rstrip("/").count("/"), m[0]))
    return [_bind(dest, source, mode) for dest, source, mode in mounts]


def _own_mounts(limits: Limits) -> list[dict[str, Any]]:
    """/proc, /dev (with pts, shm, mqueue), /sys and /tmp: the container's own, never the host's."""
    size = f"size={max(limits.tmp_bytes, 1 << 20) >> 10}k"
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", size]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        # A fresh sysfs (it shows the container's own network namespace), not the host's bound.
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", size]},
    ]


def _resources(spec: BundleSpec) -> dict[str, Any]:
    allow = [{"allow": True, "type": "c", "major": d.major, "minor": d.minor, "access": "rw"} for d in spec.devices]
    out: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}, *allow]}
    lim = spec.limits
    if lim.memory_bytes:
        out["memory"] = {"limit": lim.memory_bytes}
        if lim.swap_bytes:  # OCI's swap is memory plus swap (runc writes swap.max = swap - limit)
            out["memory"]["swap"] = lim.memory_bytes + lim.swap_bytes
    if lim.cpu_millis:
        out["cpu"] = {"quota": lim.cpu_millis * _CPU_PERIOD_US // 1000, "period": _CPU_PERIOD_US}
    if lim.pids:
        out["pids"] = {"limit": lim.pids}
    return out


def _linux(spec: BundleSpec) -> dict[str, Any]:
    ids = [{"containerID": 0, "hostID": spec.id_map.base, "size": spec.id_map.size}]
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "user", "cgroup")],
        "uidMappings": ids, "gidMappings": ids,
        "devices": [{"path": d.path, "type": "c", "major": d.major, "minor": d.minor, "fileMode": d.mode,
                     "uid": 0, "gid": 0} for d in spec.devices],
        "resources": _resources(spec),
        "maskedPaths": list(MASKED_PATHS), "readonlyPaths": list(READONLY_PATHS),
    }
    if spec.cgroup_path:
        linux["cgroupsPath"] = spec.cgroup_path
    if spec.seccomp is not None:
        linux["seccomp"] = spec.seccomp
    return linux


def build_config(spec: BundleSpec, root: str = "rootfs") -> dict[str, Any]:
    """The OCI runtime config (config.json) for ``spec`` with its root dir at ``root``."""
    uid, gid = spec.user
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": uid, "gid": gid, "additionalGids": list(spec.groups)},
                    "cwd": spec.cwd, "args": list(spec.args),
                    "env": [f"{k}={v}" for k, v in sorted(spec.env.items())],
                    "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
                    "rlimits": [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
                    "noNewPrivileges": True, "oomScoreAdj": _OOM_SCORE_ADJ},
        "root": {"path": root, "readonly": True},
        "hostname": spec.hostname,
        "mounts": [*_own_mounts(spec.limits), *_binds(spec)],
        "linux": _linux(spec),
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


def _inside(root: Path, path: str) -> Path:
    """``root / path``, made sure to stay below ``root``: no ``..``, and no symlink on the way
    (an image's top-level link to ``/etc`` must not let us write into the host's)."""
    rel = Path(path.lstrip("/"))
    if ".." in rel.parts or not rel.parts:
        raise ValueError(f"bundle: {path!r} is not a plain path below the root")
    here = root
    for part in rel.parts[:-1]:
        here = here / part
        if here.is_symlink():
            raise ValueError(f"bundle: {path!r} goes through the symlink {here.relative_to(root)}")
    return root / rel


def _mount_points(spec: BundleSpec) -> list[tuple[str, bool]]:
    """(container path, is a directory) of every mount point outside the sandbox's own tmpfs
    mounts; write_bundle makes them, so runc never writes into the rootfs."""
    points = [(p, True) for p in OWN_PATHS]
    for mount in _binds(spec):
        dest = mount["destination"]
        if not _covered(dest, list(OWN_PATHS)):
            points.append((dest, os.path.isdir(mount["source"])))
    return points


def write_bundle(bundle_dir: Path, spec: BundleSpec, rootfs: Path | None = None) -> Path:
    """Writes ``bundle_dir/config.json`` and the private root dir (``rootfs``, default
    ``bundle_dir/rootfs``): its symlinks, files and mount points, all owned by host root (the
    container's root sees them as nobody's, read-only). runc mounts the root dir from inside the
    user namespace, so every dir above it must be searchable by others."""
    rootfs = rootfs or bundle_dir / "rootfs"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    rootfs.mkdir(parents=True, exist_ok=True)
    rootfs.chmod(0o755)
    for name, target in spec.symlinks:
        link = _inside(rootfs, name)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)
    for name, text in spec.files:
        path = _inside(rootfs, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    for dest, is_dir in _mount_points(spec):
        path = _inside(rootfs, dest)
        if path.is_symlink():  # a system dir that is a link (/bin -> usr/bin) is not a mount point
            continue
        if is_dir:
            path.mkdir(parents=True, exist_ok=True)
            if dest == "/tmp":  # runc gives a tmpfs the mode of the dir it covers
                path.chmod(0o1777)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
    config = bundle_dir / "config.json"
    config.touch(mode=0o600)  # its env may hold a tenant's secrets; runc reads it as host root
    config.write_text(json.dumps(build_config(spec, str(rootfs.absolute())), indent=1))
    return bundle_dir
