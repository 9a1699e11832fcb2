"""``python -m services.nodeagent``: run one node's agent until SIGTERM or SIGINT.

On a signal it stops serving, stops every container it started and revokes its etcd lease,
leaving no process, container or key behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Mapping

from prometheus_client import REGISTRY

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.server import serve
from snapwake import telemetry
from snapwake.errors import SnapwakeError
from snapwake.service import bootstrap


async def _run(config: NodeAgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config):
        await stop.wait()


def tracing_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The OTEL_* variables to hand on to containers, as KEY=VALUE; OTEL_SERVICE_NAME stays
    here (the model server names itself)."""
    return tuple(f"{k}={v}" for k, v in sorted(env.items())
                 if k.startswith("OTEL_") and k != "OTEL_SERVICE_NAME")


def main(argv: list[str] | None = None) -> int:
    config = bootstrap(NodeAgentConfig, "nodeagent", argv)
    config = dataclasses.replace(config, container_env=(*tracing_env(os.environ), *config.container_env))
    if config.metrics_port:
        REGISTRY.register(telemetry.gpu_metrics_collector())
        telemetry.start_metrics_server(config.metrics_port)
    try:
        asyncio.run(_run(config))
    except SnapwakeError as exc:  # etcd unreachable, runc missing: say so in one line
        print(f"nodeagent: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
