"""The gateway's error leaves, and its HTTP error response (the shared OpenAI mapping).

The gateway adds these leaves to the shared tree (``snapwake.errors``):

    SnapwakeError
     +-- Unauthenticated            401: missing or unknown API key
     +-- PermissionDenied           403: a tenant's key where an operator key is needed (/metrics)
     +-- InvalidArgument
     |    +-- BodyTooLarge          413: the body is over ``max_body_bytes``
     +-- ResourceExhausted
     |    +-- QueueFull             429: the function's queue is full
     |    +-- RateLimited           429: the API key is over its requests per second
     |    +-- TooManyInFlight       429: the API key has its limit of requests in flight
     +-- DeadlineExceeded
          +-- QueueTimeout          503: waited ``queue_timeout`` for an instance

Every error the gateway answers, 401 included, is the body ``snapwake.openai.openai_error``
makes (the model server's too); 429 and 503 carry ``Retry-After`` so the ``openai`` client backs
off and retries.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from snapwake import errors
from snapwake.openai import CODES, RETRYABLE, error_body, openai_error

__all__ = ["BodyTooLarge", "PermissionDenied", "QueueFull", "QueueTimeout", "RateLimited", "TooManyInFlight",
           "Unauthenticated", "error_response"]


class Unauthenticated(errors.SnapwakeError):
    http_status, openai_type = 401, "authentication_error"


class PermissionDenied(errors.SnapwakeError):
    http_status, openai_type = 403, "permission_error"


class BodyTooLarge(errors.InvalidArgument):
    http_status = 413


class QueueFull(errors.ResourceExhausted):
    pass


class RateLimited(errors.ResourceExhausted):
    pass


class TooManyInFlight(errors.ResourceExhausted):
    pass


class QueueTimeout(errors.DeadlineExceeded):
    pass


_CODES: dict[type[errors.SnapwakeError], str] = {
    **CODES,
    Unauthenticated: "invalid_api_key",
    BodyTooLarge: "request_too_large",
    QueueFull: "queue_full",
    PermissionDenied: "operator_key_required",
    RateLimited: "rate_limit_exceeded",
    TooManyInFlight: "too_many_requests_in_flight",
    QueueTimeout: "queue_timeout",
}


def http_error_response(status: int, method: str, path: str) -> JSONResponse:
    """Starlette's own 404/405 (a route or method the gateway lacks) as an OpenAI error body."""
    if status == 405:
        return JSONResponse(error_body(f"{method} {path}: method not allowed", "invalid_request_error", None,
                                       "method_not_allowed"), 405)
    return JSONResponse(error_body(f"{path}: no such route", "invalid_request_error", None, "not_found"),
                        status if status >= 400 else 404)


def error_response(exc: BaseException, retry_after: int = 1,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Maps any exception to an OpenAI-shaped JSON response; non-domain errors become 500."""
    status, body = openai_error(exc, _CODES)
    extra = dict(headers or {})
    if status in RETRYABLE:
        extra["Retry-After"] = str(retry_after)
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=extra)
