"""The Snapwake gateway: the OpenAI REST API, per-function URLs, API keys, one bounded queue per
function, and the proxy (with SSE streaming) to a claimed instance.

    config.py            GatewayConfig (frozen, loaded once in __main__)
    models.py            OpenAI model id <-> function id, and the cached function catalogue
    protocol.py          what is checked before a claim (the shared schema, for built-in functions)
    errors.py            the gateway's error leaves and its OpenAI error response
    keys.py              API keys at rest: the admin API's (HMAC-SHA256, refreshed from the scheduler)
                         and the config's (SHA-256); constant-time lookup
    limits.py            the edge limits: body caps per field, per-key rate and in-flight limits (pure)
    middleware.py        request id, API-key auth (operator keys for /metrics), per-key limits; plain ASGI
    queue.py             the bounded per-function queue: a pure core and its asyncio edge
    scheduler_client.py  the SchedulerClient interface and its gRPC implementation
    proxy.py             relaying a request to an instance (JSON or SSE)
    serving.py           the logic behind each endpoint
    api_router.py        HTTP only: routes to serving
    openapi.py           the OpenAPI document at /openapi.json, generated from the request models
    app.py               build_app()
    metrics.py           the gateway's Prometheus series, in their own registry
    dashboard/           the web dashboard (one page polling api/state)
    scheduler_fake.py    InMemoryScheduler: a SchedulerClient on fixed endpoints (tests)
"""

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "build_app"]
