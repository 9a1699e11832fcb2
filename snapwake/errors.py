"""The one error tree shared by every service, and its mapping to gRPC and HTTP.

    SnapwakeError
     +-- InvalidArgument      (bad input; ``field`` names it)
     +-- NotFound
     +-- AlreadyExists
     +-- FailedPrecondition   (the object is in the wrong state)
     +-- Aborted              (lost a compare-and-swap; retry)
     +-- Unavailable          (transient; retry later)
     +-- ResourceExhausted    (capacity or queue full)
     +-- DeadlineExceeded
     +-- StartFailed          (an instance could not be started or restored)
     +-- Unauthenticated      (no credentials, or unknown or revoked ones)
     +-- PermissionDenied     (known caller, not allowed this call or resource)

Lower libraries' exceptions are translated at exactly one place per boundary. For gRPC:

- servers: ``snapwake.grpcserver.ErrorInterceptor``, which every ``GrpcServer`` installs, answers a
  domain error with ``code`` and ``grpc_details`` and anything else with INTERNAL;
- clients: ``snapwake.grpcclient.call`` (and ``stream``, ``blocking_stream``), which raise
  ``from_rpc_error`` of a failed call.
"""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted", "AlreadyExists", "DeadlineExceeded", "FailedPrecondition", "InvalidArgument",
    "NotFound", "PermissionDenied", "ResourceExhausted", "SnapwakeError", "StartFailed", "Unauthenticated",
    "Unavailable",
    "from_rpc_error", "to_grpc_code",
]


class SnapwakeError(Exception):
    """Root of every domain error."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    openai_type: str = "server_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"


class NotFound(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.NOT_FOUND, 404, "not_found_error"


class AlreadyExists(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.ALREADY_EXISTS, 409, "conflict_error"


class FailedPrecondition(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error"


class Aborted(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.ABORTED, 409, "conflict_error"


class Unavailable(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"


class ResourceExhausted(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"


class DeadlineExceeded(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.DEADLINE_EXCEEDED, 503, "timeout_error"


class StartFailed(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.UNAVAILABLE, 503, "start_failed"


class Unauthenticated(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"


class PermissionDenied(SnapwakeError):
    code, http_status, openai_type = grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"


_BY_CODE: dict[grpc.StatusCode, type[SnapwakeError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Aborted,
                              Unavailable, ResourceExhausted, DeadlineExceeded, Unauthenticated, PermissionDenied)
}

# Details starting with this tag mark a StartFailed sent over gRPC as UNAVAILABLE.
START_FAILED_TAG = "start failed: "


def to_grpc_code(exc: SnapwakeError) -> grpc.StatusCode:
    """The gRPC status code for a domain error."""
    return exc.code


def grpc_details(exc: SnapwakeError) -> str:
    """The details string sent with a domain error (StartFailed is tagged so clients can tell)."""
    return START_FAILED_TAG + exc.message if isinstance(exc, StartFailed) else exc.message


def from_rpc_error(err: grpc.RpcError) -> SnapwakeError:
    """Translates a gRPC client error into the domain error tree."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if details.startswith(START_FAILED_TAG):
        return StartFailed(details[len(START_FAILED_TAG):])
    cls = _BY_CODE.get(code, SnapwakeError)
    return cls(details)
