"""The one exception -> OpenAI error mapping."""

from __future__ import annotations

import json

import pytest

from services.gateway.errors import QueueFull, QueueTimeout, Unauthenticated, error_response
from snapwake import errors


@pytest.mark.parametrize(("exc", "status", "type_", "param", "code"), [
    (errors.InvalidArgument("bad", field="max_tokens"), 400, "invalid_request_error", "max_tokens",
     "invalid_argument"),
    (Unauthenticated("Incorrect API key provided"), 401, "authentication_error", None, "invalid_api_key"),
    (errors.NotFound("The model 'x' does not exist", field="model"), 404, "not_found_error", "model",
     "model_not_found"),
    (QueueFull("full"), 429, "rate_limit_error", None, "queue_full"),
    (errors.ResourceExhausted("no capacity"), 429, "rate_limit_error", None, "resource_exhausted"),
    (QueueTimeout("waited"), 503, "timeout_error", None, "queue_timeout"),
    (errors.StartFailed("image pull failed"), 503, "start_failed", None, "start_failed"),
    (errors.Unavailable("down"), 503, "service_unavailable", None, "unavailable"),
    (errors.DeadlineExceeded("slow"), 503, "timeout_error", None, "deadline_exceeded"),
    (errors.FailedPrecondition("state"), 409, "conflict_error", None, "failed_precondition"),
    (RuntimeError("boom"), 500, "server_error", None, "internal_error"),
])
def test_error_mapping(exc: BaseException, status: int, type_: str, param: str | None, code: str) -> None:
    response = error_response(exc, retry_after=7)
    body = json.loads(response.body)
    assert response.status_code == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == (type_, param, code)
    assert body["error"]["message"]
    assert (response.headers.get("retry-after") == "7") is (status in (429, 503))
    assert ("www-authenticate" in response.headers) is (status == 401)


def test_internal_error_hides_the_message() -> None:
    body = json.loads(error_response(RuntimeError("secret path /etc/x")).body)
    assert "secret" not in body["error"]["message"]
