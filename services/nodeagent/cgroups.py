"""Reading a container's memory cgroup: how often the kernel's OOM killer acted in it.

runc puts each container at ``/{cgroup_parent}/{container id}`` (the bundle's ``cgroupsPath``)
and removes it on ``runc delete``, so the count is read when the nodeagent notices the
container gone and before it deletes it. cgroup v1 says ``oom_kill N`` in
``memory.oom_control`` (kernel 4.13+); v2 says it in ``memory.events``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["CGROUP_ROOT", "oom_kills", "parse_oom_kills"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_oom_kills(text: str) -> int:
    """The ``oom_kill`` count of a memory.oom_control or memory.events text (0 when absent)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _memory_files(cgroup_path: str, root: Path) -> list[Path]:
    rel = cgroup_path.strip("/")
    if (root / "cgroup.controllers").exists():  # the unified (v2) hierarchy
        return [root / rel / "memory.events"]
    return [root / "memory" / rel / "memory.oom_control"]


def oom_kills(cgroup_path: str, root: Path = CGROUP_ROOT) -> int:
    """Processes the OOM killer killed in the container's cgroup (0 when it cannot tell)."""
    for path in _memory_files(cgroup_path, root):
        with contextlib.suppress(OSError):
            return parse_oom_kills(path.read_text())
    return 0
