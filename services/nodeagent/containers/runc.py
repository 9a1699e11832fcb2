"""``RuncContainers``: drives the real ``runc`` binary with a ``--root`` this nodeagent owns.

Because the root directory is ours, ``runc list`` shows exactly the containers a previous run
of this nodeagent left behind, which is what orphan clean-up needs. Every call has a timeout.

A container runs under a ``runc run --keep`` that stays in the foreground (not ``--detach``):
it is this process's child, relays the container's output to the log and exits with its init's
exit status (128+N after signal N), which is how a dead container's exit status is known. The
container stays (stopped) until ``delete``, as a detached one would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import subprocess
import time
from pathlib import Path

from services.nodeagent import logs
from services.nodeagent.containers.base import Containers, ContainerState, ContainerStatus
from snapwake import errors

__all__ = ["RuncContainers"]

log = logging.getLogger(__name__)


def _tail(path: Path, limit: int = 2000) -> str:
    return logs.tail(path, limit).strip()


class RuncContainers(Containers):
    """Containers under ``root`` (``runc --root``), ids starting with ``prefix``."""

    def __init__(self, root: Path, binary: str = "runc", prefix: str = "sw-", timeout: float = 20.0,
                 log_max_bytes: int = logs.DEFAULT_MAX_BYTES) -> None:
        self.root, self.binary, self.prefix, self.timeout = Path(root), binary, prefix, timeout
        self.log_max_bytes = log_max_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Container id -> its foreground ``runc run``, until the container is deleted.
        self._runs: dict[str, asyncio.subprocess.Process] = {}

    async def _runc(self, *args: str, stdout: int | object = subprocess.PIPE,
                    stderr: int | object = subprocess.PIPE) -> tuple[int, str, str]:
        """Runs ``runc --root ROOT args...``; returns (rc, stdout, stderr)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary, "--root", str(self.root), *args, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, start_new_session=True)  # type: ignore[arg-type]
        except OSError as exc:
            raise errors.Unavailable(f"cannot execute runc ({self.binary}): {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise errors.Unavailable(f"runc {args[0]} timed out after {self.timeout:.0f}s") from exc
        return proc.returncode or 0, (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")

    async def run(self, container_id: str, bundle: Path, log_path: Path) -> int:
        pid_file = bundle / "init.pid"
        pid_file.unlink(missing_ok=True)
        # runc relays the container's stdout/stderr to its own: the log file (its own errors too).
        with logs.container_output(log_path, self.log_max_bytes) as output:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.binary, "--root", str(self.root), "run", "--keep", "--bundle", str(bundle), "--pid-file",
                    str(pid_file), container_id, stdin=subprocess.DEVNULL, stdout=output.write_fd,
                    stderr=output.write_fd, start_new_session=True)
            except OSError as exc:
                raise errors.Unavailable(f"cannot execute runc ({self.binary}): {exc}") from exc
        self._runs[container_id] = proc
        deadline = time.monotonic() + self.timeout
        while not pid_file.exists():  # runc renames it into place once init runs
            if proc.returncode is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                rc = await proc.wait()
                self._runs.pop(container_id, None)
                await asyncio.to_thread(output.wait, 2.0)  # its last words reach the file
                raise errors.Unavailable(f"runc run {container_id} failed (rc {rc}): {_tail(log_path, 600)}")
            await asyncio.sleep(0.01)
        return int(pid_file.read_text().strip())

    async def state(self, container_id: str) -> ContainerState | None:
        rc, out, err = await self._runc("state", container_id)
        run = self._runs.get(container_id)
        if rc != 0:
            if "does not exist" in err or "not exist" in err:
                return None
            raise errors.Unavailable(f"runc state {container_id} failed: {err.strip()}")
        state = _parse(json.loads(out))
        if not state.alive and run is not None:
            with contextlib.suppress(TimeoutError):  # runc exits right after its init
                await asyncio.wait_for(asyncio.shield(run.wait()), 1.0)
            state = dataclasses.replace(state, exit_code=run.returncode)
        return state

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        rc, _, err = await self._runc("kill", container_id, signal)
        if rc != 0 and "not exist" not in err and "not running" not in err and "stopped" not in err:
            log.warning("runc kill %s %s: %s", container_id, signal, err.strip())

    async def delete(self, container_id: str) -> None:
        rc, _, err = await self._runc("delete", "--force", container_id)
        if rc != 0 and "not exist" not in err:
            raise errors.Unavailable(f"runc delete {container_id} failed: {err.strip()}")
        run = self._runs.pop(container_id, None)
        if run is not None:  # its init is gone: runc exits at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wait(), self.timeout)

    async def pids(self, container_id: str) -> list[int]:
        """``runc ps``: the pids of the container's cgroup, init first."""
        state = await self.state(container_id)
        if state is None or not state.alive:
            return []
        rc, out, err = await self._runc("ps", "--format", "json", container_id)
        if rc != 0:
            if "not exist" in err or "not running" in err or "stopped" in err:
                return []
            raise errors.Unavailable(f"runc ps {container_id} failed: {err.strip()}")
        pids = [int(p) for p in json.loads(out or "null") or []]
        return sorted(pids, key=lambda p: (p != state.pid, p))

    async def list(self) -> list[ContainerState]:
        rc, out, err = await self._runc("list", "--format", "json")
        if rc != 0:
            raise errors.Unavailable(f"runc list failed: {err.strip()}")
        items = json.loads(out or "null") or []
        return [_parse(i) for i in items if str(i.get("id", "")).startswith(self.prefix)]


def _parse(item: dict[str, object]) -> ContainerState:
    status = str(item.get("status", "stopped"))
    try:
        parsed = ContainerStatus(status)
    except ValueError:
        parsed = ContainerStatus.STOPPED
    return ContainerState(str(item["id"]), parsed, int(item.get("pid") or 0))  # type: ignore[call-overload]
