"""OpenAI model ids, and the short-lived cache of deployed functions behind ``/v1/models``.

A model id (docs/CONTRACTS.md) is ``name`` when the namespace is ``default``, else
``namespace/name``; the tenant comes from the API key. A full ``tenant/namespace/name`` is
accepted when its tenant is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from services.gateway.scheduler_client import FunctionInfo, SchedulerClient
from snapwake import errors
from snapwake.openai.ids import DEFAULT_NAMESPACE, model_id

__all__ = ["FunctionCatalog", "function_id_for", "model_id_for"]

log = logging.getLogger(__name__)

_PART = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _unknown(model: str) -> errors.NotFound:
    return errors.NotFound(f"The model '{model}' does not exist", field="model")


def function_id_for(model: str, tenant: str) -> str:
    """The function id a caller of ``tenant`` means by ``model``; ``NotFound`` if it cannot be one."""
    parts = model.split("/")
    if len(parts) == 1:
        parts = [tenant, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [tenant, *parts]
    if len(parts) != 3 or parts[0] != tenant or not all(_PART.fullmatch(p) for p in parts):
        raise _unknown(model)
    return "/".join(parts)


def model_id_for(function_id: str) -> str:
    """The OpenAI model id of a function, as its own tenant sees it."""
    return model_id(function_id)


class FunctionCatalog:
    """Every deployed function, from ``ListFunctions``, reused for ``ttl`` seconds.

    A lookup that misses refreshes at once (a function created a moment ago must not 404), but
    at most every ``min_refresh`` seconds, so a client asking for unknown models cannot flood the
    scheduler. If the scheduler cannot be reached, the last answer is used while there is one.
    """

    def __init__(self, client: SchedulerClient, ttl: float = 1.5, min_refresh: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._ttl, self._min_refresh, self._clock = ttl, min_refresh, clock
        self._functions: dict[str, FunctionInfo] | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, older_than: float) -> dict[str, FunctionInfo]:
        async with self._lock:  # concurrent callers share one ListFunctions
            if self._functions is not None and self._clock() - self._fetched_at < older_than:
                return self._functions
            try:
                listed = await self._client.list_functions()
            except errors.SnapwakeError as exc:
                if self._functions is None:
                    raise
                log.warning("ListFunctions failed (%s); using the previous answer", exc.message)
                return self._functions
            self._functions = {f.function_id: f for f in listed}
            self._fetched_at = self._clock()
            return self._functions

    async def list(self, tenant: str) -> list[FunctionInfo]:
        """The tenant's functions, sorted by id."""
        functions = await self._refresh(self._ttl)
        return sorted((f for f in functions.values() if f.tenant == tenant), key=lambda f: f.function_id)

    async def get(self, function_id: str, model: str | None = None) -> FunctionInfo:
        """The function, or ``NotFound`` naming ``model`` (the id the caller used)."""
        functions = await self._refresh(self._ttl)
        if function_id not in functions:
            # The cached list may predate a CreateFunction that just returned: wait out the
            # refresh floor (at most min_refresh) so the miss is answered from a newer list.
            age = self._clock() - self._fetched_at
            if 0 <= age < self._min_refresh:
                await asyncio.sleep(self._min_refresh - age)
            functions = await self._refresh(self._min_refresh)
        if function_id not in functions:
            raise _unknown(model or function_id)
        return functions[function_id]
