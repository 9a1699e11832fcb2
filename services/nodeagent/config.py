"""The nodeagent's configuration: a frozen dataclass loaded once in ``__main__``."""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.nodeagent.seccomp import DEFAULT_PROFILE
from snapwake.config import EtcdTlsConfig, is_wildcard, parse_address, parse_endpoints
from snapwake.tlsconfig import ServerSettings

__all__ = ["NodeAgentConfig"]

_REPO = str(Path(__file__).resolve().parents[2])
# Where `make run` and pytest write their models (pytest names its base temp dir the same way);
# a real node lists its model volumes instead.
def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (as pytest, which says "unknown")
        return "unknown"


_DEV_MODEL_ROOTS = (f"{_REPO}/var/models", f"{tempfile.gettempdir()}/pytest-of-{_user()}")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class NodeAgentConfig(ServerSettings, EtcdTlsConfig):
    """Snapwake nodeagent: runs instance containers on one node."""

    name: str = field(default="node-1", metadata=_help("node name; its etcd key is /snapwake/nodes/{name}"))
    listen: str = field(default="127.0.0.1:7070", metadata=_help("host:port the gRPC server binds"))
    advertise: str = field(default="", metadata=_help("host:port others dial (default: listen)"))
    etcd: str = field(default="127.0.0.1:2379", metadata=_help(
        "etcd members' client addresses, host:port[,host:port...] (every member of a cluster)"))
    blobstore: str = field(default="127.0.0.1:7080", metadata=_help("this node's blobstore gRPC address"))
    blobstore_advertise: str = field(default="", metadata=_help(
        "host:port other nodes' blobstores fetch snapshots from this node's at, published in the node "
        "record (default: blobstore)"))
    handover_socket: str = field(default="/tmp/snapwake/handover.sock",
                                 metadata=_help("the blobstore's handover Unix socket (bound into containers)"))
    state_dir: str = field(default="/tmp/snapwake/nodeagent",
                           metadata=_help("instance dirs and the runc root live here"))
    containers: str = field(default="runc", metadata=_help("how containers run: runc | fake (tests only)"))
    runc_binary: str = field(default="runc", metadata=_help("path of the runc binary"))
    python: str = field(default=sys.executable, metadata=_help("python executable the containers run"))
    python_path: tuple[str, ...] = field(default=(), metadata=_help(
        "extra import dirs for containers, comma separated (bound read-only, before repo_root)"))
    repo_root: str = field(default=_REPO, metadata=_help("directory holding the model server package (bound ro)"))
    lease_ttl: int = field(default=5, metadata=_help("etcd lease TTL in seconds"))
    fence_drain_s: float = field(default=30.0, metadata=_help(
        "once its lease is gone the node fences itself: seconds its serving instances get to finish "
        "requests in flight before they are stopped (see fencing.py)"))
    gpus: str = field(default="auto", metadata=_help("auto: use NVML's GPUs; none: run everything on CPU"))
    start_timeout: float = field(default=120.0, metadata=_help("default bound on a container start (s)"))
    heartbeat_interval: float = field(default=5.0, metadata=_help(
        "seconds between rewrites of the node record (schedulers skip stale nodes)"))
    reconcile_interval: float = field(default=1.0, metadata=_help("seconds between reconcile passes"))
    ended_linger: float = field(default=5.0, metadata=_help("seconds an ENDED/FAILED key stays visible"))
    log_level: str = field(default="INFO", metadata=_help("logging level"))
    log_max_bytes: int = field(default=16 << 20, metadata=_help(
        "bytes of container output kept per output.log; it is then rotated to output.log.1 (the "
        "older one goes), so an instance's output takes at most twice this on disk"))
    metrics_port: int = field(default=0, metadata=_help("port serving Prometheus /metrics (0: off)"))
    max_concurrent_restores: int = field(default=4, metadata=_help(
        "driver restores (with their weight DMA) run at once on this node; more wait their turn"))
    max_concurrent_checkpoints: int = field(default=2, metadata=_help(
        "driver checkpoints (parking, new standbys) run at once; more wait their turn"))
    standby_host_memory_fraction: float = field(default=0.8, metadata=_help(
        "share of the node's host memory that its instances may hold with one more PROCESS-mode "
        "standby (whose GPU state waits in host memory); a standby that would pass it is refused "
        "(see hostmem.py); the rest is left to the kernel, this agent and the blobstore's cache"))
    cold_standby_after_s: float = field(default=0.0, metadata=_help(
        "a standby parked this many seconds is paged out to the node's swap (the cold tier, "
        "coldstandby.py): it keeps ~0.2 GB resident instead of its checkpoint, and its restore "
        "reads it back; 0 turns the tier off. Needs swap on the node; containers may then swap "
        "up to their memory limit"))
    cold_standby_min_bytes: int = field(default=64 << 20, metadata=_help(
        "a standby holding less host memory (PSS) than this is not worth paging out"))
    container_env: tuple[str, ...] = field(default=(), metadata=_help(
        "extra KEY=VALUE variables for every container, comma separated; main adds the OTEL_* "
        "tracing variables it was started with"))
    # --- the sandbox (docs/CONTRACTS.md, Node layout and sandbox) ---
    model_roots: tuple[str, ...] = field(default=_DEV_MODEL_ROOTS, metadata=_help(
        "directories a spec's model_dir must resolve under, comma separated (default: the dev and "
        "test locations; set it on a real node)"))
    rootfs_dir: str = field(default="/run/snapwake/rootfs", metadata=_help(
        "containers' private root dirs ({rootfs_dir}/{name}/{instance}); runc mounts them from inside "
        "the user namespace, so this dir and those above it must be searchable by others"))
    userns_base: int = field(default=100_000, metadata=_help(
        "host uid and gid of a container's root; container ids 0..userns_size-1 map from here"))
    userns_size: int = field(default=65_536, metadata=_help("ids mapped into a container's user namespace"))
    seccomp_profile: str = field(default=DEFAULT_PROFILE, metadata=_help(
        "containers-common seccomp profile (JSON) every container is filtered by"))
    pids_limit: int = field(default=4096, metadata=_help("processes and threads a container may have"))
    default_memory_bytes: int = field(default=16 << 30, metadata=_help(
        "a container's memory limit when its spec sets no resources.host_memory_bytes"))
    default_cpu_millis: int = field(default=1000, metadata=_help(
        "a container's CPU quota when its spec sets no resources.cpu_millis (the scheduler's default)"))
    tmp_bytes: int = field(default=1 << 30, metadata=_help(
        "size of a container's private /tmp and of its /dev/shm (each; counted in its memory limit)"))
    cgroup_parent: str = field(default="snapwake", metadata=_help(
        "cgroup under which containers get theirs (/{cgroup_parent}/{container id})"))
    gpu_memory_watch: bool = field(default=True, metadata=_help(
        "every reconcile pass, read each serving instance's GPU memory (NVML, per process) and stop "
        "one over its slice (gpu.memory); off without NVML"))
    gpu_memory_builtin_allowance_bytes: int = field(default=2 << 30, metadata=_help(
        "GPU memory the built-in model server may use beyond its slice before it is stopped: its "
        "CUDA context and kernels, which it cannot cap (a user image's slice must hold its own)"))
    driver_lib_dir: str = field(default="", metadata=_help(
        "directory of the NVIDIA driver's libraries, e.g. /usr/local/nvidia/lib64 (default: ldconfig -p)"))
    endpoint_host: str = field(default="", metadata=_help(
        "address the per-instance forwarders listen on, and that gateways dial (default: advertise's host)"))
    forward_idle_timeout: float = field(default=600.0, metadata=_help(
        "seconds a forwarded connection may carry no byte either way before it is closed"))
    # --- user images (docs/CONTRACTS.md, User images (node side)) ---
    image_cache_dir: str = field(default="", metadata=_help(
        "the image cache's root: one read-only rootfs per digest, owned by the containers' ids "
        "(default: {state_dir}/images); it and the dirs above it must be searchable by others"))
    image_cache_max_bytes: int = field(default=50 << 30, metadata=_help(
        "disk the image cache keeps for images no instance runs; least recently used go first"))
    image_secrets_dir: str = field(default="", metadata=_help(
        "directory of registry secrets, {name}.json each (containers-auth.json); empty: none"))
    image_local_roots: tuple[str, ...] = field(default=_DEV_MODEL_ROOTS, metadata=_help(
        "the only directories oci-archive:/oci:/docker-archive: references may name, comma "
        "separated (default: the dev and test locations; set it on a real node)"))
    user_idle_quiet_s: float = field(default=1.0, metadata=_help(
        "a user image goes IDLE once no byte has moved through its endpoint for this many seconds, "
        "and RUNNING again when bytes move (it has no control socket to count requests in flight)"))

    @property
    def advertise_address(self) -> str:
        return self.advertise or self.listen

    @property
    def blobstore_advertise_address(self) -> str:
        """Where peers reach this node's blobstore (the node record's ``blobstore_address``)."""
        return self.blobstore_advertise or self.blobstore

    @property
    def instance_host(self) -> str:
        """Where instances are reached: the forwarders' listen address."""
        return self.endpoint_host or parse_address(self.advertise_address)[0]

    @property
    def rootfs_base(self) -> Path:
        """This node's containers' root dirs."""
        return Path(self.rootfs_dir) / self.name

    @property
    def image_root(self) -> Path:
        """The image cache's root dir."""
        return Path(self.image_cache_dir or Path(self.state_dir) / "images")

    @property
    def instances_dir(self) -> Path:
        return Path(self.state_dir) / "instances"

    @property
    def runc_root(self) -> Path:
        return Path(self.state_dir) / "runc"

    def validate(self) -> list[str]:
        """Every bad key, by name."""
        bad = self.tls_problems("nodeagent")
        for key in ("listen", "etcd", "blobstore"):
            try:
                (parse_endpoints if key == "etcd" else parse_address)(getattr(self, key))
            except ValueError as exc:
                bad.append(f"{key}: {exc}")
        bad.extend(self.etcd_tls_problems())
        # Other hosts dial these: a wildcard (0.0.0.0) can be listened on, never dialled.
        for key, address in (("advertise", self.advertise_address),
                             ("blobstore_advertise", self.blobstore_advertise_address)):
            try:
                host, _ = parse_address(address)
            except ValueError as exc:
                if getattr(self, key):  # a default's problem is reported under listen/blobstore
                    bad.append(f"{key}: {exc}")
                continue
            if is_wildcard(host):
                bad.append(f"{key}: {address} is no address other hosts can dial; set {key} to this "
                           f"node's routable host:port")
        if self.endpoint_host and is_wildcard(self.endpoint_host):
            bad.append(f"endpoint_host: {self.endpoint_host} is no address gateways can dial")
        if self.containers not in ("runc", "fake"):
            bad.append(f"containers: expected runc or fake, got {self.containers!r}")
        if self.gpus not in ("auto", "none"):
            bad.append(f"gpus: expected auto or none, got {self.gpus!r}")
        if self.lease_ttl < 2:
            bad.append(f"lease_ttl: must be at least 2 seconds, got {self.lease_ttl}")
        if not self.name or "/" in self.name:
            bad.append(f"name: must be non-empty without '/', got {self.name!r}")
        if not Path(self.handover_socket).is_absolute():
            bad.append(f"handover_socket: must be an absolute path, got {self.handover_socket!r}")
        if not Path(self.repo_root, "modelserver").is_dir():
            bad.append(f"repo_root: {self.repo_root} has no modelserver package")
        if not 0 <= self.metrics_port < 65536:
            bad.append(f"metrics_port: out of range: {self.metrics_port}")
        if self.log_max_bytes < 4096:
            bad.append(f"log_max_bytes: must be at least 4096, got {self.log_max_bytes}")
        bad.extend(f"container_env: expected KEY=VALUE, got {item!r}"
                   for item in self.container_env if not item.partition("=")[0] or "=" not in item)
        for key in ("max_concurrent_restores", "max_concurrent_checkpoints"):
            if getattr(self, key) < 1:
                bad.append(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.cold_standby_after_s < 0 or self.cold_standby_min_bytes < 0:
            bad.append(f"cold_standby_after_s, cold_standby_min_bytes: must not be negative, got "
                       f"{self.cold_standby_after_s}, {self.cold_standby_min_bytes}")
        if not 0.0 < self.standby_host_memory_fraction <= 1.0:
            bad.append(f"standby_host_memory_fraction: must be above 0 and at most 1, "
                       f"got {self.standby_host_memory_fraction}")
        if self.fence_drain_s < 0:
            bad.append(f"fence_drain_s: must not be negative, got {self.fence_drain_s}")
        if self.start_timeout <= 0 or self.reconcile_interval <= 0:
            bad.append("start_timeout/reconcile_interval: must be positive")
        return bad + self._sandbox_problems()

    def _sandbox_problems(self) -> list[str]:
        bad = [f"model_roots: {root!r} must be an absolute directory other than /"
               for root in self.model_roots if not root.startswith("/") or os.path.realpath(root) == "/"]
        if not self.rootfs_dir.startswith("/"):
            bad.append(f"rootfs_dir: must be an absolute path, got {self.rootfs_dir!r}")
        if self.userns_base < 1 or self.userns_size < 1 or self.userns_base + self.userns_size > 1 << 32:
            bad.append(f"userns_base/userns_size: need base >= 1 (host root is never mapped) and a range "
                       f"below 2^32, got {self.userns_base}+{self.userns_size}")
        if not Path(self.seccomp_profile).is_file():
            bad.append(f"seccomp_profile: {self.seccomp_profile} is not a file (apt install golang-github-containers-common)")
        for key, low in (("pids_limit", 16), ("default_memory_bytes", 64 << 20), ("default_cpu_millis", 1),
                         ("tmp_bytes", 1 << 20)):
            if getattr(self, key) < low:
                bad.append(f"{key}: must be at least {low}, got {getattr(self, key)}")
        if not self.cgroup_parent or ".." in self.cgroup_parent.split("/"):
            bad.append(f"cgroup_parent: must be a non-empty path without '..', got {self.cgroup_parent!r}")
        if self.gpu_memory_builtin_allowance_bytes < 0:
            bad.append(f"gpu_memory_builtin_allowance_bytes: must not be negative, "
                       f"got {self.gpu_memory_builtin_allowance_bytes}")
        if self.forward_idle_timeout <= 0:
            bad.append("forward_idle_timeout: must be positive")
        if self.user_idle_quiet_s <= 0:
            bad.append(f"user_idle_quiet_s: must be positive, got {self.user_idle_quiet_s}")
        if self.image_cache_dir and not self.image_cache_dir.startswith("/"):
            bad.append(f"image_cache_dir: must be an absolute path, got {self.image_cache_dir!r}")
        if self.image_cache_max_bytes < 0:
            bad.append(f"image_cache_max_bytes: must not be negative, got {self.image_cache_max_bytes}")
        if self.image_secrets_dir and not self.image_secrets_dir.startswith("/"):
            bad.append(f"image_secrets_dir: must be an absolute path, got {self.image_secrets_dir!r}")
        bad.extend(f"image_local_roots: {root!r} must be an absolute directory other than /"
                   for root in self.image_local_roots if not root.startswith("/") or os.path.realpath(root) == "/")
        # Containers run as an unprivileged host user: what they run must be readable by others.
        python = Path(self.python)
        paths = [self.repo_root, *self.python_path, str(python.parent.parent),
                 str(Path(os.path.realpath(python)).parent.parent)]
        for path in paths:
            if os.path.isdir(path) and os.stat(path).st_mode & 0o005 != 0o005:
                bad.append(f"repo_root/python_path/python: {path} must be readable and searchable by others (o+rx)")
        return bad
