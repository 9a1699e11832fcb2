"""The gateway under a real uvicorn, in front of a real (small) OpenAI server on a free port.

The scheduler is the in-memory ``InMemoryScheduler`` (the gRPC client has its own test); the
client is the real ``openai`` package wherever it can observe the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from services.gateway import GatewayConfig, build_app
from services.gateway.proxy import Upstream
from services.gateway.scheduler_client import Claim, ClaimSource, FunctionInfo
from services.gateway.scheduler_fake import InMemoryScheduler
from snapwake.openai import ModelLimits
from snapwake.testing import free_port

pytestmark = pytest.mark.timeout(30)

KEY, TENANT = "sk-acme", "acme"
OPERATOR = "sk-operator"
MAX_BODY = 64 << 10


def _words(body: dict[str, Any]) -> list[str]:
    if "messages" in body:
        return str(body["messages"][-1]["content"]).split()
    return str(body["prompt"]).split()


def _chunk(body: dict[str, Any], i: int, word: str | None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": {"content": word} if word else {},
                                 "finish_reason": None if word else "stop"}]
    data: dict[str, Any] = {"id": f"c{i}", "object": "chat.completion.chunk", "created": 0,
                            "model": body.get("model"), "choices": choices}
    if usage:
        data["usage"] = usage
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _chat(request: Request) -> Any:
    """Echoes the last user message word by word; "user" selects a misbehaviour."""
    body = await request.json()
    words = [w + " " for w in _words(body)]
    usage = {"prompt_tokens": len(words), "completion_tokens": len(words), "total_tokens": 2 * len(words)}
    if not body.get("stream"):
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "".join(words)}}],
                             "usage": usage, "x_request_id": request.headers.get("x-request-id")})

    async def events() -> AsyncIterator[bytes]:
        for i, word in enumerate(words):
            yield _chunk(body, i, word)
            if body.get("user") == "break" and i == 1:
                raise RuntimeError("instance died mid-stream")
            if body.get("user") == "slow":
                await asyncio.sleep(0.2)
        yield _chunk(body, len(words), None)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _chunk(body, len(words) + 1, None, usage)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Runs ``app`` under uvicorn on a free loopback port in this event loop."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on", timeout_graceful_shutdown=2))
    task = asyncio.ensure_future(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            assert not task.done(), "uvicorn exited during start-up"
            await asyncio.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


SERVED = "acme-labs/Echo-1B-Instruct"  # what the "byo" user image calls its model


@dataclass
class ServedUpstream:
    """A user image that knows its model only as ``SERVED`` (like vLLM's --served-model-name):
    any other ``model`` is a 404, and its answers name ``SERVED``. Streams go out in pieces of
    a few bytes, so events reach the gateway cut at arbitrary places."""

    address: str = ""
    models: list[str] = field(default_factory=list)  # the model of every request it got

    async def chat(self, request: Request) -> Any:
        body = await request.json()
        self.models.append(body.get("model"))
        if body.get("model") != SERVED:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, 404)
        if not body.get("stream"):
            return await _chat(request)
        whole = b"".join(_chunk(body, i, word + " ") for i, word in enumerate(_words(body)))
        whole += _chunk(body, 99, None) + b"data: [DONE]\n\n"

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(whole), 7):
                yield whole[i:i + 7]
                await asyncio.sleep(0.001)

        return StreamingResponse(pieces(), media_type="text/event-stream")


@pytest.fixture
async def served() -> AsyncIterator[ServedUpstream]:
    upstream = ServedUpstream()
    app = Starlette(routes=[Route("/v1/chat/completions", upstream.chat, methods=["POST"]),
                            Route("/v1/completions", upstream.chat, methods=["POST"])])
    async with serve(app) as address:
        upstream.address = address
        yield upstream


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"]),
                            Route("/v1/completions", _chat, methods=["POST"])])
    async with serve(app) as address:
        yield address


def _fn(name: str, queue_len: int = 8, queue_timeout: float = 5.0, namespace: str = "default",
        image: str = "", limits: ModelLimits | None = None, served: str = "") -> FunctionInfo:
    return FunctionInfo(f"{TENANT}/{namespace}/{name}", queue_len, queue_timeout, created_unix=1700000000,
                        image=image, limits=limits, served_model_name=served)


def _not_serving() -> JSONResponse:
    """What a model server answers while its weights are released (a standby being parked)."""
    return JSONResponse({"error": {"message": "the model is not serving (phase released)",
                                   "type": "service_unavailable", "param": None, "code": None}}, 503,
                        headers={"Retry-After": "1"})


@pytest.fixture
async def parked() -> AsyncIterator[str]:
    async def answer(request: Request) -> Any:
        return _not_serving()

    async with serve(Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])) as address:
        yield address


@pytest.fixture
async def parking() -> AsyncIterator[str]:
    """Not serving on every other call: the fake scheduler hands out the same endpoint again after
    a release, so the retry lands here while the instance serves again."""
    calls = [0]

    async def answer(request: Request) -> Any:
        calls[0] += 1
        return _not_serving() if calls[0] % 2 else await _chat(request)

    async with serve(Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"])])) as address:
        yield address


@pytest.fixture
def scheduler(upstream: str, parked: str, parking: str, served: ServedUpstream) -> InMemoryScheduler:
    s = InMemoryScheduler()
    s.deploy(_fn("parking"), [parking])  # the first claim raced its instance's parking
    s.deploy(_fn("allparked"), [parked, parked])
    s.deploy(_fn("chat"), [upstream], concurrency=4)
    s.deploy(_fn("cold"), [upstream], source=ClaimSource.COLD_START)
    s.deploy(_fn("asleep", queue_len=1, queue_timeout=0.4), [])  # scaled to zero, never starts
    s.deploy(_fn("broken", queue_timeout=30), [], start_error="image missing: registry.local/nope")
    s.deploy(_fn("flaky"), [f"127.0.0.1:{free_port()}", upstream])  # first endpoint refuses
    # The same with room for more claims on the refusing endpoint (a node whose link went down).
    s.deploy(_fn("roomy"), [f"127.0.0.1:{free_port()}", upstream], concurrency=4)
    s.deploy(_fn("tuned", namespace="team"), [upstream])
    # Built-in, with the model metadata its revision recorded: a context of 64, 100 token ids.
    s.deploy(_fn("small", limits=ModelLimits(max_context_tokens=64, vocab_size=100)), [upstream])
    s.deploy(_fn("custom", image="docker://registry.local/echo:1"), [upstream])  # a user image
    # A user image with its own name for its model, in another namespace than the default.
    s.deploy(_fn("byo", namespace="team", image="oci-archive:/srv/echo.tar", served=SERVED), [served.address],
             concurrency=4)
    return s


@pytest.fixture
async def gateway(scheduler: InMemoryScheduler) -> AsyncIterator[str]:
    config = GatewayConfig(api_keys=(f"{KEY}:{TENANT}", "sk-other:other"), operator_keys=(f"{OPERATOR}:ops",),
                           report_interval=0.1,
                           connect_timeout=1.0, read_timeout=5.0, max_body_bytes=MAX_BODY)
    async with serve(build_app(scheduler, config)) as address:
        yield f"http://{address}"


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=10) as c:
        yield c


async def _eventually(check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Polls ``check`` (state of the in-memory scheduler) for at most ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{what} not seen within {seconds}s")


async def _released(scheduler: InMemoryScheduler, function_id: str) -> None:
    await _eventually(lambda: scheduler.in_use(function_id) == 0, f"release of {function_id}'s claims")


async def test_streaming_relay_with_usage(client: openai.AsyncOpenAI, scheduler: InMemoryScheduler) -> None:
    prompt = "the quick brown fox jumps"
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == prompt.split()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(prompt.split())
    assert {c.model for c in chunks} == {"chat"}
    await _released(scheduler, "acme/default/chat")
    assert all(not failed for _, failed in scheduler.released)


async def test_non_streaming_and_completions(client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(model="team/tuned", messages=[{"role": "user", "content": "a b c"}])
    assert chat.choices[0].message.content.split() == ["a", "b", "c"]
    assert chat.model == "team/tuned"
    done = await client.completions.with_raw_response.create(model="chat", prompt="x y")
    assert done.status_code == 200


async def test_models_list_includes_scaled_to_zero(client: openai.AsyncOpenAI) -> None:
    models = {m.id: m async for m in client.models.list()}
    assert {"chat", "asleep", "broken", "team/tuned"} <= set(models)
    assert all(m.owned_by == TENANT for m in models.values())
    assert (await client.models.retrieve("team/tuned")).id == "team/tuned"
    assert (await client.models.retrieve("acme/default/asleep")).id == "asleep"
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("nope")
    assert info.value.body["param"] == "model"


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "model" and info.value.code == "model_not_found"


async def test_other_tenant_sees_nothing_of_acme(gateway: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="sk-other", max_retries=0) as other:
        assert [m.id async for m in other.models.list()] == []
        with pytest.raises(openai.NotFoundError):
            await other.chat.completions.create(model="acme/default/chat", messages=[{"role": "user", "content": "x"}])


async def test_bad_key_is_401_with_json_body(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        missing = await http.get("/v1/models")
        health = await http.get("/healthz")
    assert r.status_code == 401 and missing.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "authentication_error"
    assert health.status_code == 200
    async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", "body"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "chat"}', "messages"),
])
async def test_bad_request_is_400_naming_field(gateway: str, body: bytes, param: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = await http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


async def test_full_queue_is_429_with_retry_after(gateway: str, scheduler: InMemoryScheduler) -> None:
    body = {"model": "asleep", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as http:
        waiting = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        # The first request takes the only slot (and the gateway reports it).
        await _eventually(lambda: any(r.get("acme/default/asleep") for r in scheduler.reports), "queue report")
        full = await http.post("/v1/chat/completions", json=body)
        timed_out = await waiting
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["code"] == "queue_full"
    assert timed_out.status_code == 503 and "retry-after" in timed_out.headers
    assert timed_out.json()["error"]["code"] == "queue_timeout"


async def test_start_failure_is_503_at_once(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - started < 2  # its queue_timeout is 30 s
    assert info.value.status_code == 503 and "image missing" in info.value.message
    assert info.value.response.headers["retry-after"] == "1"


async def test_request_id_echoed_or_generated(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        given = await http.post("/v1/chat/completions", headers={"X-Request-Id": "req-42"},
                                json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
        made = await http.get("/v1/models")
        refused = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert given.headers["x-request-id"] == "req-42"
    assert given.json()["x_request_id"] == "req-42"  # passed on to the instance
    assert len(made.headers["x-request-id"]) == 32
    assert refused.headers["x-request-id"]


async def test_per_function_url_fixes_the_function(gateway: str) -> None:
    base = f"{gateway}/funcs/acme/team/tuned/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as fn_client:
        chat = await fn_client.chat.completions.create(model="whatever", messages=[{"role": "user", "content": "a"}])
        assert chat.choices[0].message.content.strip() == "a"
        assert [m.id async for m in fn_client.models.list()] == ["team/tuned"]
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-other", max_retries=0) as stranger:
        with pytest.raises(openai.NotFoundError):
            await stranger.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}])


async def test_mid_stream_failure_is_an_sse_error(client: openai.AsyncOpenAI, scheduler: InMemoryScheduler) -> None:
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three four"}], stream=True, user="break")
    got: list[str] = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got).split() == ["one", "two"]
    await _released(scheduler, "acme/default/chat")
    assert scheduler.released[-1][1] is True  # instance_failed


async def test_dead_instance_is_retried_on_another_lease(client: openai.AsyncOpenAI,
                                                         scheduler: InMemoryScheduler) -> None:
    chat = await client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "ok"}])
    assert chat.choices[0].message.content.strip() == "ok"
    assert [failed for _, failed in scheduler.released] == [True, False]


async def test_retry_waits_until_the_scheduler_heard_of_the_failure(client: openai.AsyncOpenAI,
                                                                      scheduler: InMemoryScheduler) -> None:
    """The unreachable endpoint still has room for claims: were the retry's claim asked for
    before the failed release arrived, it would land on the same endpoint again."""
    scheduler.release_delay = 0.3
    chat = await client.chat.completions.create(model="roomy", messages=[{"role": "user", "content": "ok"}])
    assert chat.choices[0].message.content.strip() == "ok"
    await _released(scheduler, "acme/default/roomy")
    assert [failed for _, failed in scheduler.released] == [True, False]


async def test_a_slow_instance_is_not_a_dead_node() -> None:
    """The dead-node bound watches the node's kernel (keepalive probes are acknowledged while
    the model server thinks), so an answer slower than the bound still arrives."""
    async def slow(request: Request) -> Any:
        await asyncio.sleep(3.5)
        return JSONResponse({"ok": True})

    upstream = Upstream(connect_timeout=2, read_timeout=30, dead_node_timeout=1.0)
    async with serve(Starlette(routes=[Route("/v1/chat/completions", slow, methods=["POST"])])) as address:
        response = await upstream.open(Claim("c-1", "i-1", address), "/v1/chat/completions", b"{}", "req-1")
        assert response.status_code == 200 and json.loads(await upstream.read(response, Claim("c-1", "i-1", address)))
    await upstream.close()


async def test_a_not_serving_instance_is_retried_on_another_lease(client: openai.AsyncOpenAI,
                                                                  scheduler: InMemoryScheduler) -> None:
    for stream in (False, True):
        scheduler.released.clear()
        if stream:
            chunks = await client.chat.completions.create(model="parking", stream=True,
                                                          messages=[{"role": "user", "content": "ok"}])
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            chat = await client.chat.completions.create(model="parking", messages=[{"role": "user", "content": "ok"}])
            text = chat.choices[0].message.content or ""
        assert text.strip() == "ok"
        await _released(scheduler, "acme/default/parking")
        # Both claims released, neither as failed: a parked instance is healthy.
        assert [failed for _, failed in scheduler.released] == [False, False]


async def test_not_serving_twice_is_a_503_with_retry_after(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = await http.post("/v1/chat/completions", json={"model": "allparked",
                                                          "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["retry-after"].isdigit()
    assert "not serving" in r.json()["error"]["message"]


async def test_client_disconnect_releases_the_lease(gateway: str, scheduler: InMemoryScheduler) -> None:
    body = {"model": "chat", "stream": True, "user": "slow",
            "messages": [{"role": "user", "content": " ".join(["w"] * 50)}]}
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                break
            assert scheduler.in_use("acme/default/chat") == 1
    started = time.monotonic()
    await _released(scheduler, "acme/default/chat")
    assert time.monotonic() - started < 2  # not after the 10 s the whole answer would take


async def test_metrics_count_cold_start_ttft_and_queue(client: openai.AsyncOpenAI, gateway: str) -> None:
    stream = await client.chat.completions.create(model="cold", messages=[{"role": "user", "content": "x y"}],
                                                  stream=True)
    _ = [c async for c in stream]
    await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {OPERATOR}"}) as http:
        text = (await http.get("/metrics")).text
    assert 'snapwake_cold_start_ttft_seconds_count{function="acme/default/cold",source="cold_start"} 1.0' in text
    assert 'function="acme/default/chat"' not in "".join(line for line in text.splitlines() if "cold_start_ttft" in line)
    assert 'snapwake_gateway_requests_total{function="acme/default/chat",status="200"} 1.0' in text
    assert 'snapwake_queue_wait_seconds_count{function="acme/default/cold"} 1.0' in text
    assert 'snapwake_gateway_queue_depth{function="acme/default/cold"} 0.0' in text


def _body(model: str, path: str, change: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = ({"prompt": "x"} if path == "/v1/completions" else {"input": "x"} if path == "/v1/embeddings"
                            else {"messages": [{"role": "user", "content": "x"}]})
    return {"model": model, **base, **change}


# Requests the built-in model server would refuse: (function, path, change to a good body, param).
REFUSED_BY_THE_SCHEMA = [
    ("chat", "/v1/chat/completions", {"n": 0}, "n"),
    ("chat", "/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
    ("chat", "/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", "/v1/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("chat", "/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("chat", "/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", "/v1/chat/completions", {"temperature": 2.5}, "temperature"),
    ("chat", "/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("chat", "/v1/completions", {"logprobs": 21}, "logprobs"),
    ("chat", "/v1/completions", {"echo": True}, "echo"),
    ("chat", "/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
    # A schema the grammar engine cannot compile (xgrammar, in the gateway's checker process).
    ("chat", "/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frob"}}}}, "response_format.json_schema.schema"),
    ("chat", "/v1/chat/completions", {"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]}, "tools"),
]
REFUSED_BY_THE_LIMITS = [
    ("small", "/v1/chat/completions", {"max_tokens": 64}, "max_tokens"),
    ("small", "/v1/chat/completions", {"max_completion_tokens": 500}, "max_completion_tokens"),
    ("small", "/v1/chat/completions", {"logit_bias": {"100": 5}}, "logit_bias"),
    ("small", "/v1/chat/completions", {"stop_token_ids": [7, 100]}, "stop_token_ids"),
    ("small", "/v1/completions", {"prompt": [1] * 60, "max_tokens": 5}, "max_tokens"),
    ("small", "/v1/completions", {"prompt": [5, 100]}, "prompt"),
    ("small", "/v1/embeddings", {}, "model"),  # a chat model serves no embeddings
]


@pytest.mark.parametrize(("name", "path", "change", "param"), REFUSED_BY_THE_SCHEMA + REFUSED_BY_THE_LIMITS)
async def test_a_request_the_model_server_would_refuse_is_400_before_any_claim(
        gateway: str, scheduler: InMemoryScheduler, name: str, path: str, change: dict[str, Any], param: str) -> None:
    # The first schema waits for the checker process's xgrammar import (seconds on a busy machine).
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        r = await http.post(path, json=_body(name, path, change))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert scheduler.acquired == []  # no claim: nothing was started or restored for it
    assert not any(f"acme/default/{name}" in report for report in scheduler.reports)


async def test_what_fits_the_recorded_limits_is_served(client: openai.AsyncOpenAI,
                                                       scheduler: InMemoryScheduler) -> None:
    chat = await client.chat.completions.create(model="small", messages=[{"role": "user", "content": "a b"}],
                                                max_tokens=63, logit_bias={"99": 1})
    assert chat.choices[0].message.content.split() == ["a", "b"]
    done = await client.completions.with_raw_response.create(model="small", prompt=[1] * 48)  # + 16 = 64
    assert done.status_code == 200
    assert scheduler.acquired == ["acme/default/small"] * 2


@pytest.mark.parametrize(("name", "path", "change", "param"), REFUSED_BY_THE_SCHEMA)
async def test_a_user_image_gets_such_a_body_passed_through(
        gateway: str, scheduler: InMemoryScheduler, name: str, path: str, change: dict[str, Any], param: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = await http.post(path, json=_body("custom", path, change))
    assert r.status_code == 200, r.text  # its image answers (here: the echo upstream)
    assert scheduler.acquired == ["acme/default/custom"]


@pytest.mark.parametrize(("change", "param"), [({"model": 5}, "model"), ({"stream": "yes"}, "stream")])
async def test_a_user_image_still_gets_the_edge_checks(gateway: str, scheduler: InMemoryScheduler,
                                                       change: dict[str, Any], param: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        r = await http.post("/v1/chat/completions", json={**_body("custom", "", {}), **change})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert scheduler.acquired == []


async def test_a_body_over_the_limit_is_413_for_every_function(gateway: str, scheduler: InMemoryScheduler) -> None:
    def body(size: int) -> bytes:
        return json.dumps(_body("custom", "", {"messages": [{"role": "user", "content": "x" * size}]})).encode()

    big = body(MAX_BODY)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        declared = await http.post("/v1/chat/completions", content=big)
        streamed = await http.post("/v1/chat/completions", content=chunked())
        assert scheduler.acquired == []
        fits = await http.post("/v1/chat/completions", content=body(MAX_BODY - 200))
    for r in (declared, streamed):
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert r.json()["error"]["code"] == "request_too_large"
    assert fits.status_code == 200 and scheduler.acquired == ["acme/default/custom"]


# --- a user image's own model name ----------------------------------------------------------

async def test_a_user_image_gets_its_served_name_and_the_client_sees_the_public_one(
        client: openai.AsyncOpenAI, served: ServedUpstream, scheduler: InMemoryScheduler) -> None:
    chat = await client.chat.completions.create(model="team/byo", messages=[{"role": "user", "content": "a b c"}])
    assert chat.model == "team/byo" and chat.choices[0].message.content.split() == ["a", "b", "c"]
    done = await client.completions.create(model="acme/team/byo", prompt="x y")
    assert done.model == "acme/team/byo"  # the name the client used, as the built-in server echoes it
    assert served.models == [SERVED, SERVED]
    await _released(scheduler, "acme/team/byo")


async def test_a_user_image_stream_names_the_public_model_in_every_event(
        client: openai.AsyncOpenAI, served: ServedUpstream, scheduler: InMemoryScheduler) -> None:
    prompt = "one two three four five six seven"
    stream = await client.chat.completions.create(model="team/byo", messages=[{"role": "user", "content": prompt}],
                                                  stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks).split() == prompt.split()
    assert len(chunks) == len(prompt.split()) + 1 and {c.model for c in chunks} == {"team/byo"}
    assert served.models == [SERVED]
    await _released(scheduler, "acme/team/byo")
    assert all(not failed for _, failed in scheduler.released)


async def test_a_user_image_answers_raw_bytes_without_its_served_name(gateway: str, served: ServedUpstream) -> None:
    """Per-function URL (no model in the body) and a raw SSE read: the served name never leaks."""
    body = {"messages": [{"role": "user", "content": "p q"}], "stream": True}
    async with httpx.AsyncClient(base_url=gateway, headers={"Authorization": f"Bearer {KEY}"}) as http:
        plain = await http.post("/funcs/acme/team/byo/v1/chat/completions", json={**body, "stream": False})
        async with http.stream("POST", "/funcs/acme/team/byo/v1/chat/completions", json=body) as r:
            raw = b"".join([piece async for piece in r.aiter_bytes()])
    assert plain.status_code == 200 and plain.json()["model"] == "team/byo"
    assert r.status_code == 200 and SERVED.encode() not in raw + plain.content
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and {json.loads(e)["model"] for e in events[:-1]} == {"team/byo"}
    assert served.models == [SERVED, SERVED]


async def test_user_images_are_listed_by_their_public_name(client: openai.AsyncOpenAI) -> None:
    ids = {m.id async for m in client.models.list()}
    assert {"team/byo", "custom"} <= ids and SERVED not in ids
    assert (await client.models.retrieve("team/byo")).id == "team/byo"


async def test_health_and_unknown_routes_answer_as_vllm(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        assert (await http.get("/health")).status_code == 200  # open, as /healthz
        auth = {"Authorization": f"Bearer {KEY}"}
        missing = await http.get("/v1/no-such-route", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong = await http.delete("/v1/models", headers=auth)
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
