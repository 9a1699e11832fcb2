"""The OpenAI API as users call it, through the whole running cluster (etcd, the four services,
the CPU model server with the tiny random demo model) with the real ``openai`` client: every
field is honoured (checked by its effect) or refused with a 400 naming it before any instance
is touched; streamed and not."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from embedding_model import make_embedding_model

from snapwake.devcluster import Cluster, ClusterConfig, deploy_demo

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Cluster]:
    config = ClusterConfig(var_dir=tmp_path_factory.mktemp("conformance"), gateway_port=0, scheduler_port=0,
                           nodeagent_port=0, blobstore_port=0, etcd_port=0)
    with Cluster(config) as c:
        asyncio.run(deploy_demo(c.scheduler_address, demo_model_dir, timeout=240, tls=c.client_tls()))
        _warm(c)
        yield c


def _warm(cluster: Cluster, within: float = 180.0) -> None:
    """The first request starts an instance; on a busy machine that can outlast the gateway's queue
    timeout (a 503), so it is retried, bounded, before the tests time their own requests."""
    deadline = time.monotonic() + within
    while True:
        r = httpx.post(cluster.gateway_url + "/v1/completions", timeout=120,
                       json={"model": "demo", "prompt": "hi", "max_tokens": 1})
        if r.status_code == 200:
            return
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(1)


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model="demo", messages=kw.pop("messages", CHAT), **kw)


# --- refused at the gateway, naming the field -------------------------------------------------

@pytest.mark.parametrize(("kw", "param"), [
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"extra_body": {"reasoning_effort": "low"}}, "reasoning_effort"),
    ({"n": 17}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
    ({"logit_bias": {"512": 1}}, "logit_bias"),  # past the recorded vocabulary
    ({"extra_body": {"stop_token_ids": [600]}}, "stop_token_ids"),
    ({"max_completion_tokens": 600}, "max_completion_tokens"),  # past the recorded context
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(client: openai.OpenAI, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, max_tokens=4, **kw)
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_documented_no_ops_are_accepted(client: openai.OpenAI) -> None:
    out = _chat(client, max_tokens=3, temperature=0, user="u-1", metadata={"k": "v"}, store=False,
                parallel_tool_calls=True, service_tier="auto", response_format={"type": "text"})
    plain = _chat(client, max_tokens=3, temperature=0)
    assert out.choices[0].message.content == plain.choices[0].message.content


def test_embeddings_for_a_chat_model_is_a_400_at_once(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="demo", input="hello")
    assert err.value.body["param"] == "model" and "embeddings" in err.value.body["message"]


@pytest.fixture(scope="module")
def embedder(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embedding model (Qwen3-Embedding-shaped) deployed beside the demo, its first start done."""
    path = make_embedding_model(tmp_path_factory.mktemp("models") / "emb")
    asyncio.run(deploy_demo(cluster.scheduler_address, path, name="emb", timeout=240, tls=cluster.client_tls()))
    deadline = time.monotonic() + 180
    while True:  # the first request starts an instance (a 503 if that outlasts the queue timeout)
        r = httpx.post(cluster.gateway_url + "/v1/embeddings", timeout=120, json={"model": "emb", "input": "hi"})
        if r.status_code == 200:
            return "emb"
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(1)


def test_an_embedding_model_embeds_and_refuses_generation(client: openai.OpenAI, embedder: str) -> None:
    out = client.embeddings.create(model=embedder, input=["The quick brown fox", "hello"])  # base64, decoded
    vectors = [d.embedding for d in out.data]
    assert [d.index for d in out.data] == [0, 1] and all(len(v) == 64 for v in vectors) and vectors[0] != vectors[1]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)  # normalised
    assert out.usage.prompt_tokens == out.usage.total_tokens > 2
    floats = client.embeddings.create(model=embedder, input="hello", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[1], strict=True)) < 1e-5
    for call in (lambda: client.chat.completions.create(model=embedder, messages=CHAT),
                 lambda: client.embeddings.create(model=embedder, input="x", dimensions=32)):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.body["param"] in ("model", "dimensions") and err.value.body["type"] == "invalid_request_error"


def test_health_model_card_and_unknown_routes(cluster: Cluster, client: openai.OpenAI) -> None:
    assert httpx.get(cluster.gateway_url + "/health", timeout=10).status_code == 200
    assert client.models.retrieve("demo").id == "demo"
    r = httpx.get(cluster.gateway_url + "/v1/no-such-route", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# --- honoured, checked by their effect ---------------------------------------------------------

def test_chat_logprobs_match_the_sampled_tokens(client: openai.OpenAI) -> None:
    out = _chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:  # greedy: the sampled token is the most likely one
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    if out.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == out.choices[0].message.content
    chunks = list(_chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True,
                        stream_options={"include_usage": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, pytest.approx(e.logprob)) for e in content]
    assert chunks[-1].usage.completion_tokens == len(streamed)


def test_completion_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    out = client.completions.create(model="demo", prompt="One two three", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in pairs)
    assert lp.text_offset[0] == 0
    chunks = list(client.completions.create(model="demo", prompt="One two three", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_n_gives_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    out = _chat(client, n=3, max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # each choice samples on its own
    chunks = list(_chat(client, n=3, max_tokens=6, temperature=1.0, seed=11, stream=True))
    text = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in range(3)}
    assert text == {c.index: c.message.content for c in out.choices}  # same seed: the same choices
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_a_seed_repeats_whatever_else_is_in_the_batch(client: openai.OpenAI) -> None:
    kw = {"max_tokens": 16, "temperature": 1.0, "seed": 1234}
    alone = _chat(client, **kw).choices[0].message.content
    results: list[str] = []

    def other(i: int) -> None:
        _chat(client, max_tokens=24, temperature=1.0, messages=[{"role": "user", "content": f"other {i}"}])

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    results.append(_chat(client, **kw).choices[0].message.content)
    for t in threads:
        t.join(60)
    assert results == [alone]
    assert _chat(client, **{**kw, "seed": 4321}).choices[0].message.content != alone


def test_penalties_and_vllm_sampling_fields_change_the_output(client: openai.OpenAI) -> None:
    def text(**kw: Any) -> str:
        return client.completions.create(model="demo", prompt="the the the", max_tokens=24,
                                         **{"temperature": 0, **kw}).choices[0].text

    greedy = text()
    assert text(frequency_penalty=2.0) != greedy
    assert text(presence_penalty=2.0) != greedy
    assert text(extra_body={"repetition_penalty": 3.0}) != greedy
    # top_k=1 and min_p=1 keep only the most likely token: greedy at any temperature.
    assert text(temperature=1.5, seed=3, extra_body={"top_k": 1}) == greedy
    assert text(temperature=1.5, seed=3, extra_body={"min_p": 1.0}) == greedy


def test_logit_bias_stop_token_ids_and_max_completion_tokens(client: openai.OpenAI) -> None:
    forced = client.completions.create(model="demo", prompt="hello", max_tokens=5, temperature=0,
                                       logit_bias={"300": 100}, logprobs=0)
    assert forced.usage.completion_tokens == 5
    token = forced.choices[0].logprobs.tokens[0]
    assert forced.choices[0].logprobs.tokens == [token] * 5
    stopped = client.completions.create(model="demo", prompt="hello", max_tokens=5, temperature=0,
                                        logit_bias={"300": 100}, extra_body={"stop_token_ids": [300]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 0
    capped = _chat(client, max_completion_tokens=3, temperature=0, logit_bias={"300": 100})
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"


# --- structured output ---------------------------------------------------------------------------

# Bounded strings by pattern: xgrammar 0.2.8 lets control characters into a maxLength string
# (its rule for one is [^"\\\r\n]{0,n}), which is not valid JSON.
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z ]{0,6}$"},
                                           "ok": {"type": "boolean"},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "size"], "additionalProperties": False}


def _valid(obj: Any) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "ok", "size"} and isinstance(obj["name"], str)
            and re.fullmatch("[a-z ]{0,6}", obj["name"]) is not None and isinstance(obj["ok"], bool) and isinstance(obj["size"], int)
            and 0 <= obj["size"] <= 99)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(client: openai.OpenAI, temperature: float) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    finished = 0
    for seed in range(3):
        out = _chat(client, max_tokens=60, temperature=temperature, seed=seed, response_format=fmt)
        choice = out.choices[0]
        if choice.finish_reason == "length":
            continue  # a random model may not finish; what it wrote is still a prefix of valid JSON
        assert choice.finish_reason == "stop" and _valid(json.loads(choice.message.content)), choice
        finished += 1
    assert finished  # the bounded schema leaves a random model room to finish
    chunks = list(_chat(client, max_tokens=60, temperature=0, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _chat(client, max_tokens=60, temperature=0, response_format=fmt).choices[0].message.content


def test_json_object_output_is_an_object_or_stops_at_length(client: openai.OpenAI) -> None:
    out = _chat(client, max_tokens=40, temperature=0, response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert out.choices[0].finish_reason == "length"


def test_a_schema_the_grammar_engine_refuses_is_a_400(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, max_tokens=4, response_format=fmt)
    assert err.value.body["param"] == "response_format.json_schema.schema"


# --- tools -----------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_come_back_as_tool_calls(client: openai.OpenAI, choice: Any) -> None:
    out = _chat(client, max_tokens=100, temperature=0, tools=TOOLS, tool_choice=choice)
    c = out.choices[0]
    assert c.finish_reason == "tool_calls", c
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert re.fullmatch("[a-z]{1,4}", args["city"])
    else:
        assert args == {}
    chunks = list(_chat(client, max_tokens=100, temperature=0, tools=TOOLS, tool_choice=choice, stream=True))
    deltas = [d for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for d in ch.choices[0].delta.tool_calls]
    # Incremental, as OpenAI streams them: id, type and name first, then the arguments in fragments.
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name == call.function.name
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest) and rest
    assert json.loads(first.function.arguments + "".join(d.function.arguments for d in rest)) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_and_none_answer_in_text(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):  # a random model never calls a tool by itself
        out = _chat(client, max_tokens=6, temperature=0, tools=TOOLS, tool_choice=choice)
        assert out.choices[0].finish_reason in ("stop", "length") and not out.choices[0].message.tool_calls


# --- the Responses API -----------------------------------------------------------------------------

def test_responses_text_in_and_out_streamed_and_not(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "demo", "input": "The quick brown fox", "instructions": "Be brief.",
                          "max_output_tokens": 8, "temperature": 0}
    out = client.responses.create(**kw)
    assert out.object == "response" and out.status in ("completed", "incomplete")
    assert out.output_text and out.usage.output_tokens <= 8
    if out.status == "incomplete":
        assert out.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
    assert events[-1].response.output_text == out.output_text
    chat = _chat(client, max_completion_tokens=8, temperature=0,
                 messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}])
    assert chat.choices[0].message.content == out.output_text  # the same request on the chat path


def test_responses_refuses_what_it_cannot_honour(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="demo", input="hi", tools=[{"type": "web_search_preview"}])
    assert err.value.body["param"] == "tools"
