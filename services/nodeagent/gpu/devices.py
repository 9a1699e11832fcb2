"""What a container gets for its GPU, the way the NVIDIA container toolkit gives it.

Found once when the nodeagent starts (``discover``): the device node of each GPU
(``/dev/nvidia{minor}``, the minor from NVML), the driver's control nodes, and the driver's
user-space libraries, located like the toolkit does (``ldconfig -p``, or every file of an
operator-configured directory such as ``/usr/local/nvidia/lib64``). Per container
(``NodeGpus.access``): the placed GPU's node plus the control nodes (made in the container's own
/dev and allowed in its device cgroup, never a bind of the host's /dev), the libraries bound
read-only into ``DRIVER_DIR`` under their file names with their sonames as symlinks beside them,
and the environment that points there. Inside, the GPU is CUDA device 0.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.nodeagent.bundle import Device

__all__ = ["CONTROL_NODES", "DRIVER_DIR", "DRIVER_LIBS", "GpuAccess", "NodeGpus", "device_node", "discover",
           "driver_layout", "ldconfig_entries", "parse_ldconfig", "scan_dir"]

log = logging.getLogger(__name__)

CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
# The toolkit's compute and utility libraries (nvidia-container-cli list --libraries).
DRIVER_LIBS = ("libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so",
               "libnvidia-nvvm.so", "libnvidia-gpucomp.so", "libnvidia-allocator.so", "libnvidia-cfg.so",
               "libnvidia-opencl.so", "libnvidia-pkcs11.so", "libnvidia-pkcs11-openssl3.so",
               "libnvidia-fatbinaryloader.so", "libnvidia-compiler.so")
# Where the driver's files appear in a container (a directory of our own private rootfs).
DRIVER_DIR = "/snapwake/driver"


@dataclass(frozen=True)
class GpuAccess:
    """What one container is given for its GPU."""

    devices: tuple[Device, ...]
    # (container path, host path) read-only binds of the driver's files.
    mounts: tuple[tuple[str, str], ...]
    # (container path, target) symlinks: sonames to the bound files.
    symlinks: tuple[tuple[str, str], ...]
    env: dict[str, str]


@dataclass(frozen=True)
class NodeGpus:
    """This node's GPU device nodes and driver files (empty on a CPU node)."""

    control: tuple[Device, ...] = ()
    # GPU index (NVML's, the scheduler's) -> its /dev/nvidiaN.
    nodes: dict[int, Device] = field(default_factory=dict)
    uuids: dict[int, str] = field(default_factory=dict)
    mounts: tuple[tuple[str, str], ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()

    def access(self, index: int) -> GpuAccess:
        """GPU ``index`` for one container; a GPU this node has no node for gets no device (the
        container then fails its CUDA init rather than see another GPU)."""
        node = self.nodes.get(index)
        if node is None:
            log.warning("GPU %d has no device node on this node; the container gets none", index)
        visible = self.uuids.get(index) or str(index)
        env = {"LD_LIBRARY_PATH": DRIVER_DIR, "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": visible,
               "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
        devices = (node, *self.control) if node is not None else ()
        return GpuAccess(devices, self.mounts, self.symlinks, env)


def device_node(path: str) -> Device:
    """The character device at ``path`` (its numbers and permission bits); OSError or ValueError
    when it is missing or not a character device."""
    st = os.stat(path)
    if not stat.S_ISCHR(st.st_mode):
        raise ValueError(f"{path} is not a character device")
    return Device(path, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode))


def parse_ldconfig(text: str) -> list[tuple[str, str]]:
    """(soname, path) of the 64-bit entries of ``ldconfig -p`` output (32-bit entries carry no ABI
    tag after ``libc6``)."""
    out = []
    for line in text.splitlines():
        name, arrow, path = line.strip().partition(" => ")
        if not arrow or "(" not in name:
            continue
        soname, _, flags = name.partition(" (")
        if "," in flags:
            out.append((soname.strip(), path.strip()))
    return out


def driver_layout(entries: Iterable[tuple[str, str]]) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(mounts, symlinks) for the driver's files among ``entries`` of (soname, real host path)."""
    mounts: dict[str, str] = {}
    links: dict[str, str] = {}
    for soname, real in entries:
        if not soname.startswith(DRIVER_LIBS):
            continue
        file = Path(real).name
        mounts[f"{DRIVER_DIR}/{file}"] = real
        if soname != file:
            links[f"{DRIVER_DIR}/{soname}"] = file
        if soname.startswith("libcuda.so.") and f"{DRIVER_DIR}/libcuda.so" not in mounts:
            links.setdefault(f"{DRIVER_DIR}/libcuda.so", soname)  # what Triton and others dlopen
    return tuple(sorted(mounts.items())), tuple(sorted(links.items()))


def ldconfig_entries(binary: str = "ldconfig") -> list[tuple[str, str]]:
    """(soname, real path) of the loader cache's 64-bit libraries."""
    out = subprocess.run([binary, "-p"], capture_output=True, text=True, timeout=20, check=True).stdout
    return [(name, os.path.realpath(path)) for name, path in parse_ldconfig(out)]


def scan_dir(lib_dir: str) -> list[tuple[str, str]]:
    """(file name, real path) of every file in ``lib_dir``."""
    return [(p.name, os.path.realpath(p)) for p in sorted(Path(lib_dir).iterdir()) if p.is_file()]


def discover(gpus: dict[int, tuple[int, str]], lib_dir: str = "", dev: str = "/dev") -> NodeGpus:
    """This node's nodes and driver files for ``gpus`` (index -> (device minor, uuid)); empty
    without GPUs. A GPU without its node, or no ``nvidiactl``, raises OSError naming the path."""
    if not gpus:
        return NodeGpus()
    nodes = {index: device_node(f"{dev}/nvidia{minor}") for index, (minor, _) in gpus.items()}
    control = []
    for name in CONTROL_NODES:
        try:
            control.append(device_node(f"{dev}/{name}"))
        except OSError:
            if name == "nvidiactl":
                raise
            log.info("no %s/%s on this node; containers go without it", dev, name)
    entries = scan_dir(lib_dir) if lib_dir else ldconfig_entries()
    mounts, links = driver_layout(entries)
    if not any(p.startswith(f"{DRIVER_DIR}/libcuda.so") for p, _ in (*mounts, *links)):
        raise OSError(f"no libcuda.so found in {lib_dir or 'the ldconfig cache'}")
    return NodeGpus(tuple(control), nodes, {i: uuid for i, (_, uuid) in gpus.items()}, mounts, links)
