"""Talking to one container's model server: HTTP health, the control socket, /proc and its log.

Each call is bounded; failures become ``snapwake.errors`` here, once, at this boundary.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from snapwake import errors, protocols

__all__ = ["HostMemory", "control", "handover", "health_phase", "host_memory", "host_rss_bytes",
           "parse_smaps_rollup"]


async def health_phase(client: httpx.AsyncClient, endpoint: str, limit_s: float = 2.0,
                       path: str = "/health") -> str | None:
    """The model server's phase from ``GET /health`` ("serving" when it answers 200), None when it is
    not listening yet. A user image's readiness path may be another (``path``)."""
    try:
        resp = await client.get(f"http://{endpoint}{path}", timeout=limit_s)
    except httpx.HTTPError:
        return None
    if resp.status_code == 200:
        return "serving"
    with contextlib.suppress(ValueError, AttributeError):
        return str(resp.json().get("phase") or f"http {resp.status_code}")
    return f"http {resp.status_code}"


async def control(socket_path: str | Path, msg: dict[str, Any], limit_s: float) -> dict[str, Any]:
    """One control request; a refused, timed-out or ``ok: false`` answer raises Unavailable.

    The socket lives in a directory the container owns, so the container could put a symlink
    in its place: it is opened without following one, and reached through that open file."""
    try:
        fd = os.open(socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.Unavailable(f"control {msg.get('op')} at {socket_path}: {exc}") from exc
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise errors.Unavailable(f"control {msg.get('op')}: {socket_path} is not a socket")
        return await _request("control", f"/proc/self/fd/{fd}", msg, limit_s, shown=str(socket_path))
    finally:
        os.close(fd)


async def handover(socket_path: str, msg: dict[str, Any], limit_s: float) -> dict[str, Any]:
    """One request to the blobstore's handover socket (``prepare``); failures as ``control``."""
    return await _request("handover", socket_path, msg, limit_s)


async def _request(what: str, socket_path: str, msg: dict[str, Any], limit_s: float,
                   shown: str = "") -> dict[str, Any]:
    op = msg.get("op")
    try:
        reply = await protocols.request(socket_path, msg, limit_s)
    except TimeoutError as exc:
        raise errors.Unavailable(f"{what} {op}: no reply within {limit_s:.1f}s") from exc
    except (OSError, ConnectionError, ValueError) as exc:
        raise errors.Unavailable(f"{what} {op} at {shown or socket_path}: {exc}") from exc
    if not reply.get("ok"):
        raise errors.Unavailable(f"{what} {op} failed: {reply.get('error', reply)}")
    return reply


def host_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class HostMemory(NamedTuple):
    """A process's host memory, in bytes. RSS counts every resident page in full, shared
    library pages too (libtorch and the CUDA libraries, which every standby maps from the same
    page cache: RSS 2.1 GB against PSS 1.7 GB for a standby on the H100); PSS divides each page
    by the processes that map it; private (USS) counts only the pages no other process maps,
    what stopping the process would give back."""

    rss: int
    pss: int
    private: int


def parse_smaps_rollup(text: str) -> HostMemory:
    """RSS, PSS and private bytes from the text of ``/proc/PID/smaps_rollup``; raises
    ValueError naming the line or field that is not there."""
    kib: dict[str, int] = {}
    for line in text.splitlines()[1:]:  # the first line is the [rollup] pseudo-mapping
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) != 2 or fields[1] != "kB" or not fields[0].isdigit():
            raise ValueError(f"smaps_rollup: cannot read line {line!r}")
        kib[name] = int(fields[0])
    missing = [k for k in ("Rss", "Pss", "Private_Clean", "Private_Dirty") if k not in kib]
    if missing:
        raise ValueError(f"smaps_rollup: no {', '.join(missing)}")
    return HostMemory(kib["Rss"] << 10, kib["Pss"] << 10, (kib["Private_Clean"] + kib["Private_Dirty"]) << 10)


def host_memory(pid: int) -> HostMemory:
    """RSS, PSS and private bytes of ``pid`` (zeros when it is gone). The kernel walks the
    process's page tables for this (milliseconds for a GB), so call it off the event loop.
    Without smaps_rollup (kernels before 4.14) PSS and private read 0 and RSS is VmRSS."""
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except (OSError, ValueError):
        return HostMemory(host_rss_bytes(pid), 0, 0)
