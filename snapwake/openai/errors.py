"""The one OpenAI error body, and the one function that maps an exception to it.

Every error Snapwake answers in the OpenAI API, from the gateway or the model server, as JSON
or as an SSE event, is ``{"error": {"message", "type", "param", "code"}}``:

- the HTTP status and ``type`` come from the ``snapwake.errors`` class;
- ``param`` is the error's ``field``;
- ``code`` comes from the caller's code table (``CODES`` and the gateway's own leaves), else it
  is the class name in snake case (``InvalidArgument`` -> ``invalid_argument``).

Anything that is not a ``SnapwakeError`` is a bug: a 500 whose message names only the class.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from snapwake import errors

__all__ = ["CODES", "RETRYABLE", "error_body", "openai_error"]

log = logging.getLogger(__name__)

# Statuses whose clients should retry later; both edges send Retry-After with them.
RETRYABLE = frozenset({429, 503})

# Codes the openai clients and people grep for; others are derived from the class name.
CODES: Mapping[type[errors.SnapwakeError], str] = {
    errors.NotFound: "model_not_found",
    errors.StartFailed: "start_failed",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _code(exc: errors.SnapwakeError, codes: Mapping[type[errors.SnapwakeError], str]) -> str:
    for cls in type(exc).__mro__:
        if cls in codes:
            return codes[cls]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def openai_error(exc: BaseException,
                 codes: Mapping[type[errors.SnapwakeError], str] = CODES) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for ``exc``; non-domain errors are a logged 500."""
    if isinstance(exc, errors.SnapwakeError):
        return exc.http_status, error_body(exc.message, exc.openai_type, exc.field, _code(exc, codes))
    log.error("unhandled error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return 500, error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal_error")
