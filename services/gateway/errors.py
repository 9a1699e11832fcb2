"""The one OpenAI error body, and the one function that maps exceptions to it.

The gateway adds three leaves to the shared tree (``snapwake.errors``):

    SnapwakeError
     +-- Unauthenticated            401: missing or unknown API key
     +-- ResourceExhausted
     |    +-- QueueFull             429: the function's queue is full
     +-- DeadlineExceeded
          +-- QueueTimeout          503: waited ``queue_timeout`` for an instance

Every error the gateway answers, 401 included, is ``{"error": {"message", "type", "param",
"code"}}``; 429 and 503 carry ``Retry-After`` so the ``openai`` client backs off and retries.
"""

from __future__ import annotations

import logging
import re

from starlette.responses import JSONResponse

from snapwake import errors

__all__ = ["QueueFull", "QueueTimeout", "Unauthenticated", "error_body", "error_response"]

log = logging.getLogger(__name__)


class Unauthenticated(errors.SnapwakeError):
    http_status, openai_type = 401, "authentication_error"


class QueueFull(errors.ResourceExhausted):
    pass


class QueueTimeout(errors.DeadlineExceeded):
    pass


# Statuses whose clients should retry later; both get Retry-After.
_RETRYABLE = frozenset({429, 503})

# Codes the openai clients and people grep for; others are derived from the class name.
_CODES: dict[type[errors.SnapwakeError], str] = {
    Unauthenticated: "invalid_api_key",
    errors.NotFound: "model_not_found",
    QueueFull: "queue_full",
    QueueTimeout: "queue_timeout",
    errors.StartFailed: "start_failed",
}


def _code(exc: errors.SnapwakeError) -> str:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException, retry_after: int = 1,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Maps any exception to an OpenAI-shaped JSON response; non-domain errors become 500."""
    if isinstance(exc, errors.SnapwakeError):
        status, body = exc.http_status, error_body(exc.message, exc.openai_type, exc.field, _code(exc))
    else:
        log.error("unhandled error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        status, body = 500, error_body(f"internal error: {type(exc).__name__}", "server_error", None,
                                       "internal_error")
    extra = dict(headers or {})
    if status in _RETRYABLE:
        extra["Retry-After"] = str(retry_after)
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=extra)
