"""Talking to one container's runtime: HTTP health, the control socket, /proc and its log.

Each call is bounded; failures become ``snapwake.errors`` here, once, at this boundary.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx

from snapwake import errors, protocols

__all__ = ["control", "handover", "health_phase", "host_rss_bytes", "tail"]


async def health_phase(client: httpx.AsyncClient, endpoint: str, limit_s: float = 2.0) -> str | None:
    """The runtime's phase from ``GET /health`` ("serving" when it answers 200), None when it is
    not listening yet."""
    try:
        resp = await client.get(f"http://{endpoint}/health", timeout=limit_s)
    except httpx.HTTPError:
        return None
    if resp.status_code == 200:
        return "serving"
    with contextlib.suppress(ValueError, AttributeError):
        return str(resp.json().get("phase") or f"http {resp.status_code}")
    return f"http {resp.status_code}"


async def control(socket_path: str | Path, msg: dict[str, Any], limit_s: float) -> dict[str, Any]:
    """One control request; a refused, timed-out or ``ok: false`` answer raises Unavailable."""
    op = msg.get("op")
    try:
        reply = await protocols.request(str(socket_path), msg, limit_s)
    except TimeoutError as exc:
        raise errors.Unavailable(f"control {op}: no reply within {limit_s:.1f}s") from exc
    except (OSError, ConnectionError, ValueError) as exc:
        raise errors.Unavailable(f"control {op}: {exc}") from exc
    if not reply.get("ok"):
        raise errors.Unavailable(f"control {op} failed: {reply.get('error', reply)}")
    return reply


async def handover(socket_path: str, msg: dict[str, Any], limit_s: float) -> dict[str, Any]:
    """One request to the blobstore's handover socket (``prepare``)."""
    op = msg.get("op")
    try:
        reply = await protocols.request(socket_path, msg, limit_s)
    except TimeoutError as exc:
        raise errors.Unavailable(f"handover {op}: no reply within {limit_s:.1f}s") from exc
    except (OSError, ConnectionError, ValueError) as exc:
        raise errors.Unavailable(f"handover {op} at {socket_path}: {exc}") from exc
    if not reply.get("ok"):
        raise errors.Unavailable(f"handover {op} failed: {reply.get('error', reply)}")
    return reply


def host_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tail(path: Path, max_bytes: int = 4096) -> str:
    """The last ``max_bytes`` of a log file, starting at a line boundary where possible."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    if size > max_bytes and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode(errors="replace")
