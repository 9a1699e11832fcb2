"""``DashboardKeyMiddleware``: lets a browser through the gateway's API-key auth.

A browser cannot put ``Authorization: Bearer`` on a page load, so with keys configured the
dashboard is opened once as ``/dashboard/?key=KEY``. A known key is moved into an HttpOnly,
SameSite=Strict cookie scoped to ``/dashboard`` (``Secure`` when served over TLS) and the browser is redirected to the bare URL
(so the key leaves the address bar and history). On later requests the cookie becomes the Bearer
header, and ``AuthMiddleware`` (which runs after this) checks it exactly as for the API; an
unknown key is passed on the same way, so it gets the API's usual 401.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.keys import KeyStore

__all__ = ["COOKIE", "DashboardKeyMiddleware"]

COOKIE = "snapwake_dashboard_key"
_ASK_FOR_KEY = ("<!doctype html><title>Snapwake</title><p>This gateway needs an API key. "
                "Open <code>{prefix}/?key=YOUR_KEY</code> once; the key is kept in a cookie.</p>")


class DashboardKeyMiddleware:
    """``?key=`` to a cookie, and the cookie to a Bearer header, under ``prefix`` only."""

    def __init__(self, app: ASGIApp, keys: KeyStore, prefix: str = "/dashboard") -> None:
        self.app = app
        self.keys = keys
        self.prefix = prefix

    def _ours(self, scope: Scope) -> bool:
        path = str(scope.get("path", ""))
        return bool(self.keys) and (path == self.prefix or path.startswith(self.prefix + "/"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._ours(scope):
            return await self.app(scope, receive, send)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        key = query.get("key", [""])[-1]
        if key and self.keys.lookup(key) is not None:
            response = RedirectResponse(scope["path"], status_code=303, headers={"Cache-Control": "no-store"})
            # Secure when this request came over TLS: the browser then never sends it in clear.
            response.set_cookie(COOKIE, key, path=self.prefix, httponly=True, samesite="strict",
                                secure=scope.get("scheme") == "https")
            return await response(scope, receive, send)
        headers = dict(scope["headers"])
        if b"authorization" not in headers:
            key = key or cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(COOKIE, "")
            if not key and scope["path"] in (self.prefix, self.prefix + "/"):
                # A person, not a program: say how to get in rather than the API's JSON 401.
                return await HTMLResponse(_ASK_FOR_KEY.format(prefix=self.prefix), status_code=401)(
                    scope, receive, send)
            if key:
                bearer = (b"authorization", b"Bearer " + key.encode("latin-1", "replace"))
                scope = {**scope, "headers": [*scope["headers"], bearer]}
        await self.app(scope, receive, send)
