"""``FakeContainers``: runs a bundle's process as a plain subprocess, without any isolation.

Only for unit tests of the pure core on machines without runc; it honours the parts of the
OCI config that matter to the nodeagent (args, env, cwd) and ignores mounts and namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signals
import subprocess
from pathlib import Path

from services.nodeagent import logs
from services.nodeagent.containers.base import Containers, ContainerState, ContainerStatus
from snapwake import errors

__all__ = ["FakeContainers"]


class FakeContainers(Containers):
    """Containers are subprocesses of this process, keyed by id."""

    isolates_network = False

    def __init__(self, prefix: str = "sw-", log_max_bytes: int = logs.DEFAULT_MAX_BYTES) -> None:
        self.prefix, self.log_max_bytes = prefix, log_max_bytes
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    async def run(self, container_id: str, bundle: Path, log_path: Path) -> int:
        if container_id in self._procs:
            raise errors.Unavailable(f"container {container_id} already exists")
        process = json.loads((bundle / "config.json").read_text())["process"]
        env = dict(e.split("=", 1) for e in process.get("env", []))
        with logs.container_output(log_path, self.log_max_bytes) as output:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *process["args"], env=env, cwd=process.get("cwd") or "/", stdin=subprocess.DEVNULL,
                    stdout=output.write_fd, stderr=output.write_fd, start_new_session=True)
            except OSError as exc:
                raise errors.Unavailable(f"cannot start {process['args'][0]}: {exc}") from exc
        self._procs[container_id] = proc
        return proc.pid

    async def state(self, container_id: str) -> ContainerState | None:
        proc = self._procs.get(container_id)
        if proc is None:
            return None
        if proc.returncode is None:
            return ContainerState(container_id, ContainerStatus.RUNNING, proc.pid)
        return ContainerState(container_id, ContainerStatus.STOPPED, 0, proc.returncode)

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        proc = self._procs.get(container_id)
        if proc is not None and proc.returncode is None:
            proc.send_signal(getattr(signals, "SIG" + signal.removeprefix("SIG")))

    async def delete(self, container_id: str) -> None:
        proc = self._procs.pop(container_id, None)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # the whole group, as a container's cgroup goes
                os.killpg(proc.pid, signals.SIGKILL)
        if proc is not None:
            await asyncio.wait_for(proc.wait(), 10)

    async def pids(self, container_id: str) -> list[int]:
        """The subprocess and everything in its session (it was started in a new one)."""
        proc = self._procs.get(container_id)
        if proc is None or proc.returncode is not None:
            return []
        return [proc.pid] + sorted(p for p in _session(proc.pid) if p != proc.pid)

    async def list(self) -> list[ContainerState]:
        states = [await self.state(cid) for cid in self._procs if cid.startswith(self.prefix)]
        return [s for s in states if s is not None]


def _session(sid: int) -> list[int]:
    """Pids whose session id is ``sid`` (from /proc/PID/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # after "(comm)": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found
