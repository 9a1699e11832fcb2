"""Plain ASGI middleware: request ids, API-key auth and the per-key request limits.

They store what they learn in the ASGI scope under ``snapwake.*`` keys; read them with
``request_id(scope)``, ``tenant(scope)``, ``key_id(scope)`` and ``arrival(scope)`` rather than
a state bag. ``/healthz`` and ``/openapi.json`` are open; ``/metrics`` takes only an operator key
(``operator_keys``) once API keys are configured, since its labels name every tenant's functions.
With no keys at all (auth off), ``/metrics`` and the dashboard answer loopback clients only
(``LoopbackOnlyMiddleware``).
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import (
    PermissionDenied,
    RateLimited,
    TooManyInFlight,
    Unauthenticated,
    error_response,
)
from services.gateway.keys import KeyStore
from services.gateway.limits import KeyLimiter

__all__ = ["AuthMiddleware", "LimitMiddleware", "LoopbackOnlyMiddleware", "RequestIdMiddleware", "arrival", "key_id", "request_id", "tenant"]

DEFAULT_TENANT = "default"
ANONYMOUS_KEY = "anonymous"  # the one key of a gateway without keys (auth off)
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Probes carry no key; the API's description names nothing of any tenant's.
_OPEN_PATHS = ("/healthz", "/health", "/openapi.json")
_OPERATOR_PATHS = ("/metrics",)


def request_id(scope: Scope) -> str:
    return str(scope.get("snapwake.request_id", ""))


def tenant(scope: Scope) -> str:
    return str(scope.get("snapwake.tenant", DEFAULT_TENANT))


def key_id(scope: Scope) -> str:
    """A short id of the request's API key (a digest prefix), or ``anonymous`` with auth off."""
    return str(scope.get("snapwake.key_id", ANONYMOUS_KEY))


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


def _bearer(scope: Scope) -> tuple[str, str]:
    """The Authorization header as given, and the Bearer key in it ("" when none)."""
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, key = header.partition(" ")
    return header, key.strip() if scheme.lower() == "bearer" else ""


class AuthMiddleware:
    """``Authorization: Bearer <key>`` to a tenant; no keys configured turns auth off.

    Operator paths (``/metrics``) take only an operator key: a tenant's key is a 403. With no
    keys of either kind they are open (a dev gateway); with API keys but no operator keys,
    closed to everyone."""

    def __init__(self, app: ASGIApp, keys: KeyStore, operators: KeyStore | None = None) -> None:
        self.app = app
        self.keys = keys
        self.operators = operators or KeyStore()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        if scope["path"] in _OPERATOR_PATHS:
            return await self._operator(scope, receive, send)
        if not self.keys:
            scope["snapwake.tenant"], scope["snapwake.key_id"] = DEFAULT_TENANT, ANONYMOUS_KEY
            return await self.app(scope, receive, send)
        header, key = _bearer(scope)
        found = self.keys.lookup(key) if key else None
        if found is None:
            return await error_response(_unauthenticated(header))(scope, receive, send)
        scope["snapwake.tenant"], scope["snapwake.key_id"] = found.tenant, found.key_id
        await self.app(scope, receive, send)

    async def _operator(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys and not self.operators:
            return await self.app(scope, receive, send)
        header, key = _bearer(scope)
        if key and self.operators.lookup(key) is not None:
            return await self.app(scope, receive, send)
        exc: Exception = _unauthenticated(header)
        if key and self.keys.lookup(key) is not None:
            exc = PermissionDenied(f"{scope['path']} needs an operator key, not a tenant's API key")
        await error_response(exc)(scope, receive, send)


def _unauthenticated(header: str) -> Unauthenticated:
    return Unauthenticated("Missing API key" if not header else "Incorrect API key provided")


class LimitMiddleware:
    """Per API key, in this replica: a request rate and a cap on requests in flight (``KeyLimiter``).

    Runs after ``AuthMiddleware``; a request counts as in flight until its response ends
    (a stream's last byte). Probes and scrapes are not counted."""

    def __init__(self, app: ASGIApp, limiter: KeyLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS + _OPERATOR_PATHS:
            return await self.app(scope, receive, send)
        key = key_id(scope)
        refused = self.limiter.admit(key, time.monotonic())
        if refused is not None:
            kind = TooManyInFlight if refused.in_flight else RateLimited
            exc = kind(f"Rate limit reached: {refused.message}; retry after {refused.retry_after}s")
            return await error_response(exc, refused.retry_after)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.done(key)


def _loopback(scope: Scope) -> bool:
    """True for a client on this host: a loopback address, or a Unix socket (no address)."""
    client = scope.get("client")
    if not client:
        return True
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class LoopbackOnlyMiddleware:
    """With auth off (no API or operator keys), ``/metrics`` and the dashboard, which show
    every function of every tenant, answer only clients on this host; others get a 403. The
    API itself stays open (a development gateway). Put it first: it needs no other state."""

    def __init__(self, app: ASGIApp, enabled: bool, prefixes: tuple[str, ...] = ("/metrics", "/dashboard")) -> None:
        self.app, self.enabled, self.prefixes = app, enabled, prefixes

    def _guarded(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or not self._guarded(scope["path"]) or _loopback(scope):
            return await self.app(scope, receive, send)
        exc = PermissionDenied(f"{scope['path']} answers only this host while the gateway has no API keys "
                               "(auth off); configure api_keys and operator_keys to open it to others")
        await error_response(exc)(scope, receive, send)
