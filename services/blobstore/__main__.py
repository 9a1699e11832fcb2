"""``python -m services.blobstore [--listen ...] [--dirs a,b] ...``: run one blobstore."""

from __future__ import annotations

import asyncio
import signal
import sys

from prometheus_client import REGISTRY

from services.blobstore.app import BlobstoreApp
from services.blobstore.config import BlobstoreConfig
from snapwake import log, telemetry
from snapwake.config import ConfigError, load


async def _run(cfg: BlobstoreConfig) -> None:
    app = BlobstoreApp(cfg)
    if cfg.metrics_port:
        REGISTRY.register(app.collector())
        telemetry.start_metrics_server(cfg.metrics_port)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load(BlobstoreConfig, argv, prog="python -m services.blobstore")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    log.setup("blobstore", cfg.log_level)
    try:
        telemetry.setup_tracing("snapwake-blobstore")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    asyncio.run(_run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
