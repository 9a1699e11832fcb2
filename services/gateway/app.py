"""``build_app``: the gateway's ASGI application, its middleware and its background work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from services.gateway import dashboard
from services.gateway.api_router import routes
from services.gateway.config import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import AuthMiddleware, RequestIdMiddleware
from services.gateway.proxy import Upstream
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.serving import OpenAIServing

__all__ = ["build_app"]

log = logging.getLogger(__name__)


def _dashboard(client: SchedulerClient, config: GatewayConfig) -> list[BaseRoute]:
    """The read-only dashboard at /dashboard, when the client offers the scheduler's admin lists
    (the gRPC client does; the in-memory one does not, and has nothing to show)."""
    if not isinstance(client, dashboard.AdminLists):
        return []
    return [Mount("/dashboard", app=dashboard.build_app(client, per_tenant=bool(config.keys)))]


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

    # DashboardKeyMiddleware turns the dashboard's key cookie into the Bearer header that
    # AuthMiddleware checks, so it must run first.
    app = Starlette(routes=[*routes(serving), *_dashboard(client, config)], lifespan=lifespan,
                    middleware=[Middleware(RequestIdMiddleware),
                                Middleware(dashboard.DashboardKeyMiddleware, keys=config.keys),
                                Middleware(AuthMiddleware, keys=config.keys)])
    return app
