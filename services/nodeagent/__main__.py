"""``python -m services.nodeagent``: run one node's agent until SIGTERM or SIGINT.

On a signal it stops serving, stops every container it started and revokes its etcd lease,
leaving no process, container or key behind.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.server import serve
from snapwake import config as config_loader
from snapwake import log as logsetup
from snapwake.errors import SnapwakeError


async def _run(config: NodeAgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config):
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_loader.load(NodeAgentConfig, argv, prog="python -m services.nodeagent")
    except config_loader.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logsetup.setup("nodeagent", config.log_level)
    try:
        asyncio.run(_run(config))
    except SnapwakeError as exc:  # etcd unreachable, runc missing: say so in one line
        print(f"nodeagent: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
