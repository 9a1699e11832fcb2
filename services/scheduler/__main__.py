"""``python -m services.scheduler [--listen host:port] [--etcd host:port] ...``."""

from __future__ import annotations

import asyncio
import signal
import sys

from prometheus_client import REGISTRY

from services.scheduler.app import Scheduler
from services.scheduler.config import SchedulerConfig
from services.scheduler.metrics import InstancesCollector
from snapwake import errors, telemetry
from snapwake.etcd import Etcd, EtcdTls
from snapwake.service import bootstrap


async def serve(cfg: SchedulerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Etcd.connect(cfg.etcd, tls=EtcdTls.from_config(cfg)) as etcd:
        scheduler = Scheduler(cfg, etcd)
        if cfg.metrics_port:
            REGISTRY.register(InstancesCollector(scheduler.state))
            telemetry.start_metrics_server(cfg.metrics_port)
        await scheduler.start()
        await stop.wait()
        await scheduler.stop()


def main(argv: list[str] | None = None) -> int:
    cfg = bootstrap(SchedulerConfig, "scheduler", argv)
    try:
        asyncio.run(serve(cfg))
    except (errors.Unavailable, errors.InvalidArgument) as exc:
        print(f"scheduler: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
