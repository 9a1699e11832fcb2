"""The model server's OpenAI API over real HTTP (uvicorn on a free port) with the real openai client,
on the demo model loaded in ``load`` mode."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from modelserver.__main__ import load_tokenizer
from modelserver.arena import MemfdArena
from modelserver.instance import Instance, Settings
from modelserver.openai import create_app
from modelserver.sampling import SamplingParams
from snapwake.testing import free_port, wait_for

MODEL = "demo"
CHAT = [{"role": "user", "content": "Hello, world! How are you today?"}]


@pytest.fixture(scope="module")
def instance(demo_model_dir: Path) -> Iterator[Instance]:
    inst = Instance(Settings(demo_model_dir), MemfdArena(), load_tokenizer(demo_model_dir))
    inst.load_from_dir()
    yield inst
    inst.release()


@pytest.fixture(scope="module")
def base_url(instance: Instance) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(instance, MODEL), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "model server HTTP server")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_health_and_models(base_url: str, client: openai.OpenAI) -> None:
    assert httpx.get(base_url + "/health", timeout=5).json() == {"phase": "serving"}
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_non_streamed(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="anything", messages=CHAT, max_tokens=8, temperature=0)
    assert out.model == "anything" and out.object == "chat.completion"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 8


def test_chat_streamed_matches_non_streamed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_greedy_is_repeatable(client: openai.OpenAI) -> None:
    runs = [client.completions.create(model=MODEL, prompt="One two three", max_tokens=20, temperature=0)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 5)}) > 1  # different seeds do sample differently


def test_stop_string_ends_output_and_is_not_included(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="The weights live", max_tokens=30, temperature=0)
    text = full.choices[0].text
    printable = [i for i in range(2, len(text) - 1) if text[i:i + 2].isprintable()]
    assert printable, f"greedy output too short to pick a stop string from: {text!r}"
    stop = text[printable[len(printable) // 2]:][:2]
    cut = client.completions.create(model=MODEL, prompt="The weights live", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 17}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_fields_are_400_naming_the_field(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_bad_messages_and_body(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot"}]}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = httpx.post(base_url + "/v1/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_cancel_stops_generation_early(instance: Instance) -> None:
    cancel = threading.Event()
    pieces = []

    def emit(piece: object) -> None:
        pieces.append(piece)
        cancel.set()

    instance.run(instance.tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=200, temperature=1.0, seed=1),
                 cancel, emit)
    assert pieces[-1].finish_reason == "cancelled" and pieces[-1].completion_tokens < 10


def test_client_disconnect_frees_the_instance(base_url: str, instance: Instance, client: openai.OpenAI) -> None:
    # Greedy "Hello" runs the whole 400 tokens when nobody leaves (no EOS on the way).
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
    assert instance.engine is not None
    before = instance.engine.stats["generated_tokens"]
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=10) as r:
        next(r.iter_lines())
    wait_for(lambda: instance.inflight == 0, 10, "in-flight count back to 0")
    assert instance.engine.stats["generated_tokens"] - before < 400  # generation stopped when the client left
    assert instance.last_request_unix > 0
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


def test_gpu_memory_slice_sizes_the_context_and_refuses_what_cannot_fit(demo_model_dir: Path) -> None:
    """The slice bounds the KV pool: a slice with room for 100 tokens of KV gets a pool of 96 (whole
    blocks of 16) and a context of 96 (a longer request is a 400 naming max_tokens), and one
    without room refuses the start."""
    from modelserver.budget import kv_bytes_per_token
    from modelserver.openai.requests import prepare_completion
    from snapwake.errors import InvalidArgument, StartFailed

    tok = load_tokenizer(demo_model_dir)
    probe = Instance(Settings(demo_model_dir), MemfdArena(), tok)
    probe.load_from_dir()
    assert probe.skeleton is not None
    per_token = kv_bytes_per_token(probe.skeleton.config, probe.skeleton.model.dtype.itemsize)
    arena = probe.arena_bytes
    probe.release()

    sized = Instance(Settings(demo_model_dir, gpu_memory_bytes=(768 << 20) + arena + 100 * per_token),
                     MemfdArena(), tok)
    sized.load_from_dir()
    assert sized.engine is not None and sized.engine.max_context == 96
    assert sized.engine.pool.tokens == 96 and sized.engine.pool.nbytes <= 100 * per_token
    with pytest.raises(InvalidArgument) as err:
        prepare_completion({"model": "m", "prompt": "hello", "max_tokens": 200}, tok, sized.engine.max_context)
    assert err.value.field == "max_tokens"
    sized.release()

    tiny = Instance(Settings(demo_model_dir, gpu_memory_bytes=1 << 20), MemfdArena(), tok)
    with pytest.raises(StartFailed, match="gpu_memory_bytes"):
        tiny.load_from_dir()


async def test_a_chat_stream_sends_nothing_before_the_first_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """The role chunk goes out with the first piece: a stream's first byte means a first token."""
    import asyncio

    from modelserver.engine import Piece
    from modelserver.openai import serving
    from modelserver.openai.requests import Prepared
    from modelserver.sampling import SamplingParams

    first_piece = asyncio.Event()

    async def pieces(instance: object, req: object, cancel: object, metrics: object = None):  # type: ignore[no-untyped-def]
        await first_piece.wait()
        yield Piece("hi", "stop", 1)

    monkeypatch.setattr(serving, "pieces", pieces)
    req = Prepared("m", [1, 2], SamplingParams(max_tokens=4, stream=True))
    events = serving.stream(None, req, True, threading.Event())  # type: ignore[arg-type]
    early = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0.2)
    assert not early.done()  # nothing sent while the (first) piece does not exist
    first_piece.set()
    role = await asyncio.wait_for(early, 5)
    assert b'"role":"assistant"' in role
    assert b'"content":"hi"' in await asyncio.wait_for(events.__anext__(), 5)


# Bad requests and what they name; the model server refused each of them before this schema.
BAD_REQUESTS = [
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"600": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"stop_token_ids": [512]}, "stop_token_ids"),
    ("/v1/chat/completions", {"top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"temperature": 5}, "temperature"),
    ("/v1/chat/completions", {"max_tokens": 100000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "robot"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 511}, "max_tokens"),
]


@pytest.mark.parametrize(("path", "change", "param"), BAD_REQUESTS)
async def test_the_gateway_refuses_with_the_model_servers_bytes(base_url: str, demo_model_dir: Path, path: str,
                                                                change: dict, param: str) -> None:
    """The same bad request gets the same status and byte-identical body from the model server and
    from the gateway in front of it, which answers without a claim (the model metadata is what a
    node reads from this model dir)."""
    import json

    from services.gateway import GatewayConfig, build_app
    from services.gateway.scheduler_client import FunctionInfo
    from services.gateway.scheduler_fake import InMemoryScheduler
    from services.nodeagent.modelinfo import read_model_metadata
    from snapwake.openai import ModelLimits

    meta = read_model_metadata(demo_model_dir)
    assert meta is not None
    scheduler = InMemoryScheduler()
    scheduler.deploy(FunctionInfo("default/default/demo", 8, 5.0, image="builtin",
                                  limits=ModelLimits.from_proto(meta)), [base_url.removeprefix("http://")])
    base = {"prompt": "hello"} if path == "/v1/completions" else {"messages": CHAT}
    raw = json.dumps({"model": "demo", **base, **change}).encode()
    app = build_app(scheduler, GatewayConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as gateway, \
            httpx.AsyncClient(base_url=base_url, timeout=10) as direct:
        via_gateway = await gateway.post(path, content=raw)
        from_server = await direct.post(path, content=raw)
    assert from_server.status_code == 400 and from_server.json()["error"]["param"] == param
    assert (via_gateway.status_code, via_gateway.content) == (from_server.status_code, from_server.content)
    assert scheduler.acquired == []


def test_metrics_count_tokens_latencies_and_the_kv_pool(base_url: str, client: openai.OpenAI) -> None:
    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    before = httpx.get(base_url + "/metrics", timeout=5).text
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=False)
    after = httpx.get(base_url + "/metrics", timeout=5).text
    made = out.usage.completion_tokens
    assert value(after, "snapwake_model_generation_tokens_total") - value(before, "snapwake_model_generation_tokens_total") == made
    assert value(after, "snapwake_model_prompt_tokens_total") - value(before, "snapwake_model_prompt_tokens_total") == \
        out.usage.prompt_tokens
    assert value(after, "snapwake_model_ttft_seconds_count") - value(before, "snapwake_model_ttft_seconds_count") == 1
    assert value(after, "snapwake_model_inter_token_seconds_count") > value(before, "snapwake_model_inter_token_seconds_count")
    assert value(after, "snapwake_model_kv_blocks_total") > 0 and value(after, "snapwake_model_requests_running") == 0
    r = httpx.get(base_url + "/v1/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(base_url + "/v1/models/" + MODEL, timeout=5)
    assert r.json()["id"] == MODEL and r.json()["max_model_len"] > 0


def test_a_chat_model_refuses_embeddings(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="hello")
    assert err.value.body["param"] == "model" and "not an embedding model" in err.value.body["message"]


def test_a_forced_tool_call_streams_as_incremental_deltas(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{3,6}$"}},
        "required": ["city"], "additionalProperties": False}}}]
    kw: dict = dict(model=MODEL, messages=CHAT, max_tokens=60, temperature=0, tools=tools,
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    args = json.loads(whole.message.tool_calls[0].function.arguments)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for d in ch.choices[0].delta.tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.function.name == "get_weather" and first.function.arguments == ""
    assert len(rest) > 2 and all(d.id is None and d.function.name is None for d in rest)  # fragments
    assert json.loads("".join(d.function.arguments for d in rest)) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
