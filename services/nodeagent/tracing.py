"""Trace context for the nodeagent's Unix-socket messages, and spans around awaitables.

The control and handover sockets carry the W3C ``traceparent`` as an optional JSON field
(``snapwake.protocols``), so the model server's and blobstore's spans join the request's trace.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from opentelemetry import propagate

from snapwake import telemetry

__all__ = ["in_span", "traceparent"]

T = TypeVar("T")


def traceparent() -> dict[str, str]:
    """``{"traceparent": ...}`` for the current span, or ``{}`` when nothing is being traced."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {"traceparent": carrier["traceparent"]} if "traceparent" in carrier else {}


async def in_span(name: str, work: Awaitable[T]) -> T:
    """Awaits ``work`` inside a span called ``name`` (a child of the current one)."""
    async with telemetry.traced(name):
        return await work
