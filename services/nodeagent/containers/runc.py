"""``RuncContainers``: drives the real ``runc`` binary with a ``--root`` this nodeagent owns.

Because the root directory is ours, ``runc list`` shows exactly the containers a previous run
of this nodeagent left behind, which is what orphan clean-up needs. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
from pathlib import Path

from services.nodeagent.containers.base import Containers, ContainerState, ContainerStatus
from snapwake import errors

__all__ = ["RuncContainers"]

log = logging.getLogger(__name__)


def _tail(path: Path, limit: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    return ""


class RuncContainers(Containers):
    """Containers under ``root`` (``runc --root``), ids starting with ``prefix``."""

    def __init__(self, root: Path, binary: str = "runc", prefix: str = "sw-", timeout: float = 20.0) -> None:
        self.root, self.binary, self.prefix, self.timeout = Path(root), binary, prefix, timeout
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

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
        # Detached without a terminal, the container inherits runc's stdio: handing runc the
        # log file makes it the model server's stdout/stderr (runc's own errors land there too).
        with open(log_path, "ab") as log_file:  # noqa: ASYNC230 - an append-open, no I/O wait
            rc, _, _ = await self._runc("run", "--detach", "--bundle", str(bundle), "--pid-file",
                                        str(pid_file), container_id, stdout=log_file, stderr=log_file)
        if rc != 0:
            raise errors.Unavailable(f"runc run {container_id} failed (rc {rc}): {_tail(log_path, 600)}")
        return int(pid_file.read_text().strip())

    async def state(self, container_id: str) -> ContainerState | None:
        rc, out, err = await self._runc("state", container_id)
        if rc != 0:
            if "does not exist" in err or "not exist" in err:
                return None
            raise errors.Unavailable(f"runc state {container_id} failed: {err.strip()}")
        return _parse(json.loads(out))

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        rc, _, err = await self._runc("kill", container_id, signal)
        if rc != 0 and "not exist" not in err and "not running" not in err and "stopped" not in err:
            log.warning("runc kill %s %s: %s", container_id, signal, err.strip())

    async def delete(self, container_id: str) -> None:
        rc, _, err = await self._runc("delete", "--force", container_id)
        if rc != 0 and "not exist" not in err:
            raise errors.Unavailable(f"runc delete {container_id} failed: {err.strip()}")

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
