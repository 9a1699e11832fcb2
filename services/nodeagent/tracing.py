"""Spans around awaitables (the trace context for socket messages is ``snapwake.telemetry``'s
``traceparent``)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from snapwake import telemetry

__all__ = ["in_span"]

T = TypeVar("T")


async def in_span(name: str, work: Awaitable[T]) -> T:
    """Awaits ``work`` inside a span called ``name`` (a child of the current one)."""
    async with telemetry.traced(name):
        return await work
