"""Plain ASGI middleware: request ids and API-key auth.

Both store what they learn in the ASGI scope under ``snapwake.*`` keys; read them with
``request_id(scope)``, ``tenant(scope)`` and ``arrival(scope)`` rather than a state bag.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import Unauthenticated, error_response

__all__ = ["AuthMiddleware", "RequestIdMiddleware", "arrival", "request_id", "tenant"]

DEFAULT_TENANT = "default"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Probes and scrapers carry no key.
_OPEN_PATHS = ("/healthz", "/metrics")


def request_id(scope: Scope) -> str:
    return str(scope.get("snapwake.request_id", ""))


def tenant(scope: Scope) -> str:
    return str(scope.get("snapwake.tenant", DEFAULT_TENANT))


def arrival(scope: Scope) -> float:
    """``time.monotonic()`` when the request arrived."""
    return float(scope.get("snapwake.arrival", time.monotonic()))


class RequestIdMiddleware:
    """Echoes a sane ``X-Request-Id`` or generates one, on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        scope["snapwake.request_id"], scope["snapwake.arrival"] = rid, time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AuthMiddleware:
    """``Authorization: Bearer <key>`` to a tenant; no keys configured turns auth off."""

    def __init__(self, app: ASGIApp, keys: Mapping[str, str]) -> None:
        self.app = app
        self.keys = dict(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self.keys:
            scope["snapwake.tenant"] = DEFAULT_TENANT
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        found = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            message = "Missing API key" if not header else "Incorrect API key provided"
            return await error_response(Unauthenticated(message))(scope, receive, send)
        scope["snapwake.tenant"] = found
        await self.app(scope, receive, send)
