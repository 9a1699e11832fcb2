"""The gateway's edge (issue 12): hashed keys, request limits, per-key rate and in-flight limits,
bounded metric labels and the operator-only /metrics.

The real Starlette app, called through httpx's ASGI transport (and the real ``openai`` client
over it); the scheduler is ``InMemoryScheduler``, whose ``acquired`` list shows that no claim
was asked for. Nothing here needs an instance: every request is refused, or waits for one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from services.gateway import GatewayConfig, build_app
from services.gateway.keys import hash_entry
from services.gateway.scheduler_client import FunctionInfo
from services.gateway.scheduler_fake import InMemoryScheduler

pytestmark = pytest.mark.timeout(60)

KEY, TENANT = "sk-acme-3f9a0c1e", "acme"
OTHER = "sk-other-77b2"
OPERATOR = "sk-ops-1d4e"
MiB = 1 << 20
# Hashed entries only: the gateway under test never sees a key in its config.
KEYS = (hash_entry(KEY, TENANT), hash_entry(OTHER, "other"))


def _fn(name: str, image: str = "", queue_timeout: float = 5.0) -> FunctionInfo:
    return FunctionInfo(f"{TENANT}/default/{name}", 8, queue_timeout, created_unix=1700000000, image=image)


def _scheduler() -> InMemoryScheduler:
    s = InMemoryScheduler()
    s.deploy(_fn("chat"), [])  # built-in; no instance: nothing here may reach one
    s.deploy(_fn("custom", image="docker://registry.local/echo:1"), [])  # a user image
    s.deploy(_fn("asleep", queue_timeout=0.5), [])
    return s


@pytest.fixture
def scheduler() -> InMemoryScheduler:
    return _scheduler()


def _gateway(scheduler: InMemoryScheduler, **overrides: Any) -> httpx.AsyncClient:
    config = GatewayConfig(**{"api_keys": KEYS, "operator_keys": (hash_entry(OPERATOR, "ops"),),
                              "rate_limit_rps": 0.0, **overrides})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(scheduler, config)),
                             base_url="http://gateway", headers={"Authorization": f"Bearer {KEY}"}, timeout=20)


@pytest.fixture
async def http(scheduler: InMemoryScheduler) -> AsyncIterator[httpx.AsyncClient]:
    async with _gateway(scheduler) as client:
        yield client


@pytest.fixture
async def client(http: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=KEY, max_retries=0,
                                  http_client=http) as c:
        yield c


def _chat(model: str = "chat", **change: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "x"}], **change}


def _assert_error(r: httpx.Response, status: int, type_: str, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert (error["type"], error["param"]) == (type_, param), error
    return error


# --- keys ---------------------------------------------------------------------------------------

async def test_hashed_keys_are_accepted_and_near_misses_refused(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v1/models")).status_code == 200
    other = await http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})
    assert other.status_code == 200
    for wrong in (KEY[:-1], KEY + "0", KEY[:-1] + "f", KEYS[0], KEYS[0].split(":")[1], ""):
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        _assert_error(r, 401, "authentication_error", None)


async def test_plaintext_keys_still_work_for_development(scheduler: InMemoryScheduler) -> None:
    async with _gateway(scheduler, api_keys=(f"{KEY}:{TENANT}",)) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer sk-nope"})).status_code == 401


# --- body size and JSON -------------------------------------------------------------------------

class _Counted:
    """A request body of ``size`` bytes in 64 KiB pieces, counting what the server pulled."""

    def __init__(self, size: int) -> None:
        self.size, self.sent = size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        piece = b" " * (64 << 10)
        while self.sent < self.size:
            self.sent += len(piece)
            yield piece


async def test_a_64_mib_body_is_413_without_reading_it(http: httpx.AsyncClient, scheduler: InMemoryScheduler) -> None:
    limit = GatewayConfig().max_body_bytes
    chunked = _Counted(64 * MiB)  # no Content-Length: counted as it arrives, stopped past the limit
    r = await http.post("/v1/chat/completions", content=chunked)
    error = _assert_error(r, 413, "invalid_request_error", "body")
    assert error["code"] == "request_too_large"
    assert limit < chunked.sent <= limit + (64 << 10)
    declared = _Counted(64 * MiB)  # Content-Length over the limit: answered before any byte is read
    r = await http.post("/v1/chat/completions", content=declared, headers={"Content-Length": str(64 * MiB)})
    _assert_error(r, 413, "invalid_request_error", "body")
    assert declared.sent <= 64 << 10  # at most the piece the transport pulls first
    assert scheduler.acquired == []


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps(_chat()).encode()[:-1] + b', "tools": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"{" * 100_000,  # deep and malformed
])
async def test_deep_json_is_400_not_500(http: httpx.AsyncClient, scheduler: InMemoryScheduler, raw: bytes) -> None:
    error = _assert_error(await http.post("/v1/chat/completions", content=raw), 400, "invalid_request_error", "body")
    assert error["message"] == "request body: JSON nested deeper than 64"
    assert scheduler.acquired == []


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "chat", "messages": [', b"\xff\xfe", b""])
async def test_malformed_json_is_400(http: httpx.AsyncClient, raw: bytes) -> None:
    _assert_error(await http.post("/v1/chat/completions", content=raw), 400, "invalid_request_error", "body")


# --- fields over their caps, for built-in functions and user images alike -------------------------

async def test_200k_messages_are_400_naming_messages(http: httpx.AsyncClient, scheduler: InMemoryScheduler) -> None:
    for model in ("chat", "custom"):
        body = _chat(model, messages=[{"role": "user", "content": "hi"}] * 200_000)
        error = _assert_error(await http.post("/v1/chat/completions", json=body), 400, "invalid_request_error",
                              "messages")
        assert "200000 messages is over the limit of 2048" in error["message"]
    assert scheduler.acquired == []


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", _chat("custom", messages=[{"role": "user", "content": "x" * 1001}]), "messages"),
    ("/v1/chat/completions", _chat("custom", messages=[{"role": "user", "content": [{"type": "text",
                                                                                    "text": "y" * 1001}]}]),
     "messages"),
    ("/v1/completions", {"model": "custom", "prompt": "z" * 1001}, "prompt"),
    ("/v1/completions", {"model": "chat", "prompt": [1] * 1001}, "prompt"),
])
async def test_a_prompt_over_the_cap_is_400_naming_it(scheduler: InMemoryScheduler, path: str, body: dict[str, Any],
                                                      param: str) -> None:
    async with _gateway(scheduler, max_prompt_chars=1000) as http:
        _assert_error(await http.post(path, json=body), 400, "invalid_request_error", param)
    assert scheduler.acquired == []


@pytest.mark.parametrize(("model", "change", "param"), [
    ("chat", {"max_tokens": 131073}, "max_tokens"),
    ("custom", {"max_tokens": 10**9}, "max_tokens"),
    ("custom", {"max_completion_tokens": 131073}, "max_completion_tokens"),
    ("custom", {"n": 17}, "n"),
])
async def test_max_tokens_and_n_over_the_caps_are_400_before_any_claim(
        client: openai.AsyncOpenAI, scheduler: InMemoryScheduler, model: str, change: dict[str, Any],
        param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], **change)
    assert info.value.body["param"] == param and "over this gateway's limit" in info.value.message
    assert scheduler.acquired == [] and scheduler.list_calls == 0  # not even the function was looked up


# --- per-key rate and in-flight limits ----------------------------------------------------------

async def test_rate_limit_is_429_with_retry_after_per_key(scheduler: InMemoryScheduler) -> None:
    async with _gateway(scheduler, rate_limit_rps=0.5, rate_limit_burst=2) as http:
        ok = [await http.get("/v1/models") for _ in range(2)]
        limited = await http.get("/v1/models")
        other = await http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})
        async with openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=KEY, max_retries=0,
                                      http_client=http) as client:
            with pytest.raises(openai.RateLimitError) as info:
                await client.models.list()
    assert [r.status_code for r in ok] == [200, 200] and other.status_code == 200
    error = _assert_error(limited, 429, "rate_limit_error", None)
    assert error["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "2"  # a token every 2 s
    assert info.value.code == "rate_limit_exceeded"


async def test_in_flight_cap_is_429_per_key(scheduler: InMemoryScheduler) -> None:
    async with _gateway(scheduler, max_in_flight_per_key=1) as http:
        waiting = asyncio.ensure_future(http.post("/v1/chat/completions", json=_chat("asleep")))
        for _ in range(200):
            if scheduler.acquired:
                break
            await asyncio.sleep(0.01)
        assert scheduler.acquired == ["acme/default/asleep"]  # the first holds the key's only slot
        refused = await http.post("/v1/chat/completions", json=_chat("asleep"))
        other = await http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"})
        timed_out = await waiting
        after = await http.get("/v1/models")
    error = _assert_error(refused, 429, "rate_limit_error", None)
    assert error["code"] == "too_many_requests_in_flight" and refused.headers["retry-after"] == "1"
    assert other.status_code == 200  # another key has its own slots
    assert timed_out.status_code == 503 and after.status_code == 200  # the slot came back
    assert scheduler.acquired == ["acme/default/asleep"]


# --- metrics ------------------------------------------------------------------------------------

def _function_labels(text: str) -> set[str]:
    return {line.split('function="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if line.startswith("snapwake_gateway_requests_total{")}


async def test_random_urls_add_at_most_one_label(http: httpx.AsyncClient) -> None:
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    await http.post("/v1/chat/completions", json=_chat(n=2))  # a known function: its own label
    before = _function_labels((await http.get("/metrics", headers=operator)).text)
    # 100 at once (under the key's in-flight cap): each miss waits out the catalogue's refresh
    # floor, which concurrent misses share.
    for _ in range(3):
        urls = [f"/funcs/acme/default/{uuid.uuid4().hex[:10]}/v1/chat/completions" for _ in range(100)]
        answers = await asyncio.gather(*(http.post(url, json=_chat()) for url in urls))
        assert {r.status_code for r in answers} == {404}
    await http.post("/v1/chat/completions", json=_chat(f"made-up-{uuid.uuid4().hex}"))
    after = _function_labels((await http.get("/metrics", headers=operator)).text)
    assert before == {"acme/default/chat"} and after - before == {"unknown"}


async def test_metrics_need_an_operator_key(http: httpx.AsyncClient, scheduler: InMemoryScheduler) -> None:
    _assert_error(await http.get("/metrics", headers={"Authorization": ""}), 401, "authentication_error", None)
    _assert_error(await http.get("/metrics", headers={"Authorization": "Bearer sk-nope"}), 401,
                  "authentication_error", None)
    tenant = await http.get("/metrics")  # a tenant's key
    assert _assert_error(tenant, 403, "permission_error", None)["code"] == "operator_key_required"
    operator = await http.get("/metrics", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert operator.status_code == 200 and "snapwake_gateway_requests" in operator.text
    assert (await http.get("/healthz", headers={"Authorization": ""})).status_code == 200
    async with _gateway(scheduler, operator_keys=()) as closed:  # keys but no operator: nobody
        assert (await closed.get("/metrics")).status_code == 403
    async with _gateway(scheduler, api_keys=(), operator_keys=()) as dev:  # auth off: open
        assert (await dev.get("/metrics", headers={"Authorization": ""})).status_code == 200
