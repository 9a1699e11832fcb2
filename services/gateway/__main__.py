"""``python -m services.gateway``: load the config, run uvicorn, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import uvicorn
from starlette.types import ASGIApp

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.scheduler_client import GrpcSchedulerClient
from snapwake.config import parse_address
from snapwake.openai.structured import prewarm
from snapwake.service import bootstrap

try:
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor
except ImportError:  # tracing is optional
    StarletteInstrumentor = None  # type: ignore[assignment,misc]

log = logging.getLogger("services.gateway")


def uvicorn_config(app: ASGIApp, config: GatewayConfig) -> uvicorn.Config:
    """uvicorn's settings for ``app``: ``listen``, the shutdown grace, and TLS when configured."""
    host, port = parse_address(config.listen)
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=int(config.shutdown_grace), lifespan="on",
                          ssl_certfile=config.tls_certfile or None, ssl_keyfile=config.tls_keyfile or None)


async def serve(config: GatewayConfig) -> None:
    """Runs until a signal; uvicorn stops accepting, lets requests finish for ``shutdown_grace``."""
    client = GrpcSchedulerClient(config.scheduler, config.gateway_id, config.rpc_timeout, config.leader_wait,
                                 config.admin_token, tls=config.client_tls())
    # The JSON schema checker's process imports xgrammar (seconds): now, not on the first schema.
    threading.Thread(target=prewarm, name="schema-check-prewarm", daemon=True).start()
    try:
        app = build_app(client, config)
        if StarletteInstrumentor is not None:
            StarletteInstrumentor.instrument_app(app)
        server = uvicorn.Server(uvicorn_config(app, config))
        log.info("gateway %s listening on %s (%s), scheduler %s", config.gateway_id, config.listen,
                 "https" if config.tls_certfile else "http", ",".join(config.scheduler))
        await server.serve()  # installs SIGINT/SIGTERM handlers itself
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    config = bootstrap(GatewayConfig, "gateway", argv).with_gateway_id()
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
