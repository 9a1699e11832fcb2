"""``build_app``: the gateway's ASGI application, its middleware and its background work."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from services.gateway.api_router import routes
from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import AuthMiddleware, RequestIdMiddleware
from services.gateway.proxy import Upstream
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.serving import OpenAIServing

__all__ = ["build_app"]

log = logging.getLogger(__name__)


def _dashboard(client: SchedulerClient) -> list[BaseRoute]:
    """The dashboard at /dashboard when its package is present (it is built separately)."""
    try:
        module = importlib.import_module("services.gateway.dashboard")
    except ImportError:
        return []
    build = getattr(module, "build_app", None)
    return [Mount("/dashboard", app=build(client))] if callable(build) else []


def build_app(client: SchedulerClient, config: GatewayConfig, upstream: Upstream | None = None) -> Starlette:
    """The gateway over ``client``; the caller owns (and closes) the client.

    ``upstream`` lets tests pass an ``Upstream`` with their own httpx transport.
    """
    serving = OpenAIServing(client, config, GatewayMetrics(), upstream)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reporter = asyncio.ensure_future(serving.queue.report_forever(config.report_interval))
        try:
            yield
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await serving.queue.drain()
            await serving.upstream.close()

    app = Starlette(routes=[*routes(serving), *_dashboard(client)], lifespan=lifespan,
                    middleware=[Middleware(RequestIdMiddleware), Middleware(AuthMiddleware, keys=config.keys)])
    return app
