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
from services.gateway.keys import ApiKeyTable, KeyStore, refresh_forever
from services.gateway.limits import KeyLimiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import (
    AuthMiddleware,
    LimitMiddleware,
    LoopbackOnlyMiddleware,
    RequestIdMiddleware,
)
from services.gateway.proxy import Upstream
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.serving import OpenAIServing
from snapwake.credentials import load_secret

__all__ = ["build_app"]

log = logging.getLogger(__name__)


def _dashboard(client: SchedulerClient, keys: KeyStore) -> list[BaseRoute]:
    """The read-only dashboard at /dashboard, when the client offers the scheduler's admin lists
    (the gRPC client does; the in-memory one does not, and has nothing to show)."""
    if not isinstance(client, dashboard.AdminLists):
        return []
    return [Mount("/dashboard", app=dashboard.build_app(client, per_tenant=bool(keys)))]


def _warn_about_keys(keys: KeyStore, operators: KeyStore) -> None:
    for what, store in (("api_keys", keys), ("operator_keys", operators)):
        if store.plaintext:
            log.warning("%s: %d entries give the key itself; use sha256:<digest>:tenant outside development "
                        "(python -m services.gateway.keys)", what, store.plaintext)
    if keys and not operators:
        log.warning("operator_keys: none configured, so /metrics answers nobody")


def build_app(client: SchedulerClient, config: GatewayConfig, upstream: Upstream | None = None) -> Starlette:
    """The gateway over ``client``; the caller owns (and closes) the client.

    ``upstream`` lets tests pass an ``Upstream`` with their own httpx transport.
    """
    serving = OpenAIServing(client, config, GatewayMetrics(), upstream)
    table = ApiKeyTable(load_secret(config.api_key_secret_file)) if config.api_key_secret_file else None
    keys, operators = config.keys.with_table(table), config.operators
    _warn_about_keys(keys, operators)
    limiter = KeyLimiter(config.rate_limit_rps, config.rate_limit_burst, config.max_in_flight_per_key,
                         config.retry_after)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.ensure_future(serving.queue.report_forever(config.report_interval))]
        if table is not None:
            tasks.append(asyncio.ensure_future(refresh_forever(table, client.fetch_api_keys, config.api_key_refresh)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await serving.queue.drain()
            await serving.upstream.close()

    # DashboardKeyMiddleware turns the dashboard's key cookie into the Bearer header that
    # AuthMiddleware checks, so it must run first.
    app = Starlette(routes=[*routes(serving), *_dashboard(client, keys)], lifespan=lifespan,
                    middleware=[Middleware(LoopbackOnlyMiddleware, enabled=not keys and not operators),
                                Middleware(RequestIdMiddleware),
                                Middleware(dashboard.DashboardKeyMiddleware, keys=keys),
                                Middleware(AuthMiddleware, keys=keys, operators=operators),
                                Middleware(LimitMiddleware, limiter=limiter)])
    return app
