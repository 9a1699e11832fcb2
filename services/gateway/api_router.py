"""HTTP only: the routes, reading requests and writing responses; the logic is in ``serving``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from services.gateway import middleware
from services.gateway.errors import BodyTooLarge
from services.gateway.openapi import openapi_document
from services.gateway.proxy import wait_disconnect
from services.gateway.serving import ENDPOINTS, OpenAIServing, RequestContext
from snapwake import errors

__all__ = ["routes"]

_FUNC_PREFIX = "/funcs/{tenant}/{namespace}/{name}"
# Answered to a client that went away (nobody reads it; it shows in logs and metrics).
_CLIENT_CLOSED = 499


async def _until_disconnect(request: Request, work: Awaitable[ASGIApp]) -> ASGIApp:
    """Runs ``work``; cancels it if the client disconnects first (which releases its claim)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watch.cancelled() or not watch.done():
            raise  # we were cancelled ourselves (shutdown), not the client
        return Response(status_code=_CLIENT_CLOSED)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body; ``BodyTooLarge`` as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body: {declared} bytes is over the limit of {limit}", field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body: over the limit of {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


def _context(request: Request, fixed_function: str | None = None) -> RequestContext:
    return RequestContext(request_id=middleware.request_id(request.scope),
                          tenant=middleware.tenant(request.scope),
                          arrival=middleware.arrival(request.scope), fixed_function=fixed_function)


def _path_function(request: Request) -> str:
    """The function a per-function URL names; only its own tenant may call it."""
    p = request.path_params
    if p["tenant"] != middleware.tenant(request.scope):
        raise errors.NotFound(f"no function {p['namespace']}/{p['name']} for this API key", field="model")
    return f"{p['tenant']}/{p['namespace']}/{p['name']}"


def routes(serving: OpenAIServing) -> list[BaseRoute]:
    """Every route of the gateway except the dashboard."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def health(request: Request) -> Response:
        return Response(status_code=200)  # as vLLM's /health: 200, no body

    document = openapi_document(serving.limits, serving.max_body_bytes)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def metrics(request: Request) -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def list_models(request: Request) -> Response:
        try:
            fixed = _path_function(request) if "name" in request.path_params else None
            return JSONResponse(await serving.list_models(middleware.tenant(request.scope), fixed))
        except Exception as exc:  # noqa: BLE001 - every error is an OpenAI error body
            return serving.error(exc)

    async def get_model(request: Request) -> Response:
        try:
            return JSONResponse(await serving.get_model(request.path_params["model"],
                                                        middleware.tenant(request.scope)))
        except Exception as exc:  # noqa: BLE001
            return serving.error(exc)

    def generation(path: str, per_function: bool) -> Route:
        async def endpoint(request: Request) -> ASGIApp:
            try:
                ctx = _context(request, _path_function(request) if per_function else None)
                raw = await _read_body(request, serving.max_body_bytes)
            except errors.SnapwakeError as exc:
                return serving.error(exc)
            return await _until_disconnect(request, serving.generate(path, raw, ctx))

        return Route((_FUNC_PREFIX if per_function else "") + path, endpoint, methods=["POST"])

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/health", health, methods=["GET"]),

        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route(_FUNC_PREFIX + "/v1/models", list_models, methods=["GET"]),
        *(generation(path, per_function) for path in ENDPOINTS for per_function in (False, True)),
    ]
