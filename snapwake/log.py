"""Logging set-up: one line per event, with the ids that tie it to an instance or request.

Use ``log.info("...", extra={"instance_id": iid})`` or ``extra={"request_id": rid}``; the
formatter prints them as ``instance=...``/``request=...`` fields.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup"]

_FIELDS = ("instance_id", "request_id", "function_id", "node")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = " ".join(f"{f.removesuffix('_id')}={getattr(record, f)}" for f in _FIELDS if hasattr(record, f))
        return f"{base} {extra}" if extra else base


def setup(service: str, level: str = "INFO") -> None:
    """Configures the root logger once for ``service``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aetcd", "grpc", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
