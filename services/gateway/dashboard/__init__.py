"""The web dashboard: one HTML page polling ``api/state`` every second.

The gateway mounts ``build_app(client)`` at ``/dashboard`` when its scheduler client offers the
admin lists (``AdminLists``). The state is built from those lists by the pure ``build_state``;
when the scheduler cannot be reached the endpoint answers 503 with ``{"ok": false, "error": ...}``
and the page shows a banner until a later poll succeeds.

With API keys configured the dashboard sits behind the same keys (see ``auth``) and shows only
the key's tenant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from services.gateway.dashboard._page import PAGE
from services.gateway.dashboard.auth import DashboardKeyMiddleware
from services.gateway.dashboard.state import build_state
from services.gateway.middleware import tenant
from snapwake import errors
from snapwake.v1 import types_pb2

__all__ = ["AdminLists", "DashboardKeyMiddleware", "build_app", "build_state"]

log = logging.getLogger(__name__)
_NO_STORE = {"Cache-Control": "no-store"}


@runtime_checkable
class AdminLists(Protocol):
    """What the dashboard needs from the gateway's scheduler client; each returns the scheduler's
    records and raises a ``snapwake.errors.SnapwakeError`` when it cannot."""

    async def list_function_records(self) -> Sequence[types_pb2.Function]: ...
    async def list_instances(self) -> Sequence[types_pb2.Instance]: ...
    async def list_nodes(self) -> Sequence[types_pb2.Node]: ...
    async def list_snapshots(self) -> Sequence[types_pb2.Snapshot]: ...


def _reason(exc: errors.SnapwakeError | TimeoutError, timeout: float) -> str:
    if isinstance(exc, errors.SnapwakeError):
        return exc.message
    return f"no answer within {timeout:g}s"


def build_app(client: AdminLists, timeout: float = 2.0, per_tenant: bool = False) -> Starlette:
    """The dashboard app; ``timeout`` bounds one state refresh (the page polls every second).

    ``per_tenant`` (API keys on) limits the state to the tenant ``AuthMiddleware`` found.
    """

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE, headers=_NO_STORE)

    async def state(request: Request) -> Response:
        try:
            lists = await asyncio.wait_for(asyncio.gather(
                client.list_function_records(), client.list_instances(), client.list_nodes(),
                client.list_snapshots()), timeout)
        except (errors.SnapwakeError, TimeoutError) as exc:
            reason = _reason(exc, timeout)
            log.info("dashboard: scheduler unreachable: %s", reason)
            return JSONResponse({"ok": False, "error": f"scheduler unreachable: {reason}", "time": time.time()},
                                status_code=503, headers=_NO_STORE)
        who = tenant(request.scope) if per_tenant else None
        return JSONResponse(build_state(*lists, now=time.time(), tenant=who), headers=_NO_STORE)

    return Starlette(routes=[Route("/", page), Route("/api/state", state)])
