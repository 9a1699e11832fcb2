"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None], timeout_s: float = 5.0,
                          what: str = "tasks") -> list[asyncio.Future[Any]]:
    """Cancels ``tasks`` and waits at most ``timeout_s`` for them to end; returns (and logs) those
    still running then. A shutdown must be bounded: a task that swallows its cancellation (a
    client library's stream, say) would otherwise hang the stop for ever. Their outcomes,
    errors included, are retrieved so nothing is logged as never retrieved."""
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    done, left = await asyncio.wait(pending, timeout=timeout_s)
    for task in done:
        if not task.cancelled():
            task.exception()
    if left:
        names = ", ".join(t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in left)
        log.warning("%s: %d did not end within %.1fs of being cancelled: %s", what, len(left), timeout_s, names)
    return list(left)
