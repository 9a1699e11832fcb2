"""The control socket server (protocol in ``snapwake.protocols``): one JSON line in, one out.

Operations block (mapping memory, talking to the blobstore), so they run in a worker thread;
domain errors become ``{"ok": false, "error": ...}`` here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from opentelemetry import trace

from modelserver.instance import Instance
from snapwake import telemetry
from snapwake.errors import InvalidArgument, SnapwakeError
from snapwake.protocols import MAX_LINE

__all__ = ["ControlServer", "handle"]

log = logging.getLogger(__name__)


def handle(instance: Instance, msg: dict[str, Any]) -> dict[str, Any]:
    """Runs one control request synchronously and returns its reply."""
    op = msg.get("op")
    try:
        if op == "status":
            return instance.status()
        if op == "release":
            return instance.release()
        if op == "attach":
            gpu = msg.get("gpu")
            # Continues the nodeagent's restore trace when it sent a traceparent.
            context = telemetry.parent_context(msg)
            with trace.get_tracer("snapwake").start_as_current_span("attach", context=context):
                return instance.attach(str(msg.get("snapshot_id") or ""), gpu if isinstance(gpu, int) else None)
        if op == "snapshot":
            return instance.snapshot(str(msg.get("snapshot_id") or ""))
        raise InvalidArgument(f"unknown op {op!r}", field="op")
    except SnapwakeError as exc:
        log.warning("control %s failed: %s", op, exc.message)
        return {"ok": False, "error": exc.message}


class ControlServer:
    """Listens on a Unix socket path for the nodeagent."""

    def __init__(self, instance: Instance, path: str) -> None:
        self.instance = instance
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from an earlier process
        self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over the limit: the rest of the stream cannot be framed
                    await self._reply(writer, {"ok": False, "error": f"bad request: longer than {MAX_LINE} bytes"})
                    return
                if not line:
                    return
                await self._reply(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            return {"ok": False, "error": f"bad request: {exc}"}
        return await asyncio.to_thread(handle, self.instance, msg)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
