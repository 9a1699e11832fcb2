"""Schemathesis against the gateway's own OpenAPI document (issue 12, Proof).

The real gateway app under uvicorn on a loopback port, its document loaded from its own
``/openapi.json``; behind it the real model server (the demo model on CPU, cut to a 96-token
context so a request without ``max_tokens`` stays cheap) for a built-in function, the stand-in
user server of the image tests (tests/oci_server.py) for a user image, a function with no
instance (its queue times out) and one whose start fails. The scheduler is ``InMemoryScheduler``
(the claims are the fake's; everything past a claim is real HTTP).

Every operation gets positive and negative cases (bounded, derandomized: tests/fuzzing.py);
a body's ``model`` and a per-function URL's path are drawn from the deployed functions as well
as left as generated, so cases reach past the catalogue lookup. Each response must be no 5xx
but a 503 with ``Retry-After``, of a status, content type, headers and body the document
declares, and a stream must be well-formed server-sent events; each request has a timeout.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import uvicorn
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from oci_server import Handler
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from modelserver.__main__ import load_tokenizer
from modelserver.arena import MemfdArena
from modelserver.instance import Instance, Settings
from modelserver.openai import create_app
from services.gateway import GatewayConfig, build_app
from services.gateway.keys import hash_entry
from services.gateway.scheduler_client import FunctionInfo
from services.gateway.scheduler_fake import InMemoryScheduler
from services.nodeagent.modelinfo import read_model_metadata
from snapwake.openai import ModelLimits
from snapwake.testing import free_port, wait_for

pytestmark = pytest.mark.timeout(300)

KEY, OPERATOR, TENANT = "sk-fuzz-5e1d", "sk-fuzz-ops-90ab", "acme"
CONTEXT = 96  # tokens: the demo model's context here
REQUEST_TIMEOUT = 30.0  # seconds; a request that takes longer is a hang
# Model ids a body may name (besides whatever schemathesis made up): the built-in function, by
# its short and full id, the user image, a function without instances, one that cannot start.
MODELS = ("demo", f"{TENANT}/default/demo", "echo", "asleep", "broken")
USER_IMAGE_PATHS = ("/v1/chat/completions",)  # what tests/oci_server.py serves


def _threaded_uvicorn(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    return server, thread, f"127.0.0.1:{port}"


def _short_context(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        doc = json.loads((dst / name).read_text())
        doc[key] = CONTEXT
        (dst / name).write_text(json.dumps(doc))
    return dst


@dataclass
class Stack:
    base_url: str
    schema: Any  # schemathesis' BaseSchema of the document the gateway serves
    scheduler: InMemoryScheduler


@pytest.fixture(scope="module")
def stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model_dir = _short_context(demo_model_dir, tmp_path_factory.mktemp("fuzz") / "demo")
    instance = Instance(Settings(model_dir, cuda_graphs=False), MemfdArena(), load_tokenizer(model_dir))
    instance.load_from_dir()
    model_server, ms_thread, ms_address = _threaded_uvicorn(create_app(instance, "demo"))

    class Echo(Handler):
        model = "echo-model"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            pass

    echo = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()

    meta = read_model_metadata(model_dir)
    assert meta is not None and meta.max_context_tokens == CONTEXT
    scheduler = InMemoryScheduler()
    fn = f"{TENANT}/default/"
    scheduler.deploy(FunctionInfo(fn + "demo", 16, 10.0, created_unix=1700000000, image="builtin",
                                  limits=ModelLimits.from_proto(meta)), [ms_address], concurrency=4)
    scheduler.deploy(FunctionInfo(fn + "echo", 16, 10.0, created_unix=1700000000,
                                  image="docker://registry.local/echo:1", served_model_name="echo-model"),
                     [f"127.0.0.1:{echo.server_address[1]}"], concurrency=4)
    scheduler.deploy(FunctionInfo(fn + "asleep", 4, 0.2, created_unix=1700000000), [])
    scheduler.deploy(FunctionInfo(fn + "broken", 4, 5.0, created_unix=1700000000), ["127.0.0.1:1"],
                     start_error="the model server exited: no config.json")
    config = GatewayConfig(api_keys=(hash_entry(KEY, TENANT),), operator_keys=(hash_entry(OPERATOR, "ops"),),
                           rate_limit_rps=0.0, max_prompt_chars=4000, max_tokens_cap=4096, max_n=4,
                           max_messages=64, max_body_bytes=256 << 10)
    gateway, gw_thread, gw_address = _threaded_uvicorn(build_app(scheduler, config))
    base_url = f"http://{gw_address}"
    try:
        yield Stack(base_url, schemathesis.openapi.from_url(base_url + "/openapi.json"), scheduler)
    finally:
        for server, thread in ((gateway, gw_thread), (model_server, ms_thread)):
            server.should_exit = True
            thread.join(10)
        echo.shutdown()
        echo.server_close()
        instance.release()


# --- checks beyond schemathesis' own ---------------------------------------------------------------

def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 500 (an unhandled error) nor any other 5xx; 503 is the one that means "later"."""
    assert response.status_code < 500 or response.status_code == 503, \
        f"{response.status_code}: {response.text[:500]}"
    return None


def retry_after_with_503(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 429 or 503 tells the client when to come back (the openai client waits that long)."""
    if response.status_code in (429, 503):
        value = response.headers.get("retry-after", [""])
        value = value[0] if isinstance(value, list) else value
        assert str(value).isdigit(), f"{response.status_code} without a Retry-After: {response.headers}"
    return None


def well_formed_stream(ctx: Any, response: Any, case: Any) -> bool | None:
    """Server-sent events whose data are JSON, ending in ``[DONE]`` or an OpenAI error event."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data, "an empty stream"
    events = [json.loads(d) for d in data if d != "[DONE]"]  # raises on a malformed event
    assert data[-1] == "[DONE]" or "error" in events[-1], f"the stream ends without [DONE]: {data[-3:]}"
    return None


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, retry_after_with_503, well_formed_stream]


# --- the operations ----------------------------------------------------------------------------

GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
FUNC = "/funcs/{tenant}/{namespace}/{name}"
# (method, path, examples per mode, whether it has input to negate)
OPERATIONS = [
    ("GET", "/healthz", 3, False),
    ("GET", "/openapi.json", 2, False),
    ("GET", "/metrics", 3, False),
    ("GET", "/v1/models", 3, False),
    ("GET", "/v1/models/{model}", 12, True),
    ("GET", FUNC + "/v1/models", 12, True),
    *(("POST", path, 30, True) for path in GENERATION),
    *(("POST", FUNC + path, 20, True) for path in GENERATION),
]


def _steer(case: Any, data: st.DataObject) -> None:
    """Points some cases at deployed functions (a made-up name only ever meets a 404)."""
    path = case.operation.path.removeprefix(FUNC)
    users = [m for m in MODELS if m != "echo" or path in USER_IMAGE_PATHS]
    if case.operation.path.startswith(FUNC) and data.draw(st.booleans(), "steer the path"):
        name = data.draw(st.sampled_from([m for m in users if "/" not in m]), "function")
        case.path_parameters = {**(case.path_parameters or {}), "tenant": TENANT, "namespace": "default",
                                "name": name}
    elif path == "/v1/models/{model}" and data.draw(st.booleans(), "steer the model"):
        case.path_parameters = {"model": data.draw(st.sampled_from(MODELS), "model")}
    elif isinstance(case.body, dict) and "model" in case.body and data.draw(st.booleans(), "steer the model"):
        case.body["model"] = data.draw(st.sampled_from(users), "model")
    # The schema's prompt is a string, token ids or a list of either; the built-in server takes
    # one prompt, so random lists mostly meet a 400: some cases get a plain text one.
    if isinstance(case.body, dict) and "prompt" in case.body and data.draw(st.booleans(), "steer the prompt"):
        case.body["prompt"] = data.draw(st.text(max_size=24), "prompt")
    # Likewise random message lists mostly meet a 400 (roles, fields): some get one plain message.
    if isinstance(case.body, dict) and "messages" in case.body and data.draw(st.booleans(), "steer the messages"):
        case.body["messages"] = [{"role": "user", "content": data.draw(st.text(max_size=24), "content")}]


def _headers(path: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR if path == '/metrics' else KEY}"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path", "examples", "negatable"), OPERATIONS,
                         ids=[f"{m} {p}" for m, p, *_ in OPERATIONS])
def test_gateway_keeps_its_document(stack: Stack, mode: GenerationMode, method: str, path: str, examples: int,
                                    negatable: bool) -> None:
    if mode is GenerationMode.NEGATIVE and not negatable:
        pytest.skip("nothing to negate: the operation takes no input")
    operation = stack.schema[path][method]
    session = requests.Session()

    @fuzz_settings(examples)
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        _steer(case, data)
        response = case.call(base_url=stack.base_url, session=session, headers=_headers(path),
                             timeout=REQUEST_TIMEOUT)
        case.validate_response(response, checks=CHECKS)
        seen.add(response.status_code)

    seen: set[int] = set()
    with session:
        run()
    if mode is GenerationMode.POSITIVE and path.endswith("completions"):
        assert 200 in seen, f"no case reached an instance's answer: {sorted(seen)}"


def test_the_document_is_served_open_and_names_every_route(stack: Stack) -> None:
    doc = requests.get(stack.base_url + "/openapi.json", timeout=10).json()  # no API key
    assert set(doc["paths"]) == {p for _, p, *_ in OPERATIONS}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == 4096 and chat["n"]["anyOf"][0]["maximum"] == 4
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 64
    busy = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["503"]
    assert busy["headers"]["Retry-After"]["required"] is True


# What the fuzzer found, kept as cases of their own (its own examples are drawn afresh).
FOUND = [
    # The demo engine stopped for good ("invalid multinomial distribution"): the logits overflowed.
    ("/v1/completions", {"model": "demo", "prompt": "\n\n\u00ff", "stream": True, "temperature": 1e-38}),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_p": 5e-324}),
]


@pytest.mark.parametrize(("path", "body"), FOUND, ids=["tiny-temperature", "tiny-top-p"])
def test_what_the_fuzzer_found_stays_fixed(stack: Stack, path: str, body: dict[str, Any]) -> None:
    for sent in (body, {**body, "temperature": 0.7, "top_p": 0.9}):  # and the instance serves on
        case = stack.schema[path]["POST"].Case(body={**sent, "max_tokens": 4})
        response = case.call(base_url=stack.base_url, headers=_headers(path), timeout=REQUEST_TIMEOUT)
        case.validate_response(response, checks=CHECKS)
        assert response.status_code == 200 and "error" not in response.text, response.text
