"""``python -m services.blobstore [--listen ...] [--dirs a,b] ...``: run one blobstore."""

from __future__ import annotations

import asyncio
import signal
import sys

from prometheus_client import REGISTRY

from services.blobstore.app import BlobstoreApp
from services.blobstore.config import BlobstoreConfig
from snapwake import telemetry
from snapwake.service import bootstrap


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
    cfg = bootstrap(BlobstoreConfig, "blobstore", argv)
    asyncio.run(_run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
