"""The stand-in user server that goes into the test image (tests/oci_server.py), run here on the
host's python: the OpenAI shapes the gateway and the readiness probe rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from snapwake.testing import free_port, wait_for

SERVER = Path(__file__).parents[1] / "oci_server.py"


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port),
                             "--model", "tiny-echo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "tests/oci_server.py")
        yield url
    finally:
        proc.kill()
        proc.wait(10)


def test_health_and_models(base: str) -> None:
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny-echo"]


def test_chat_completion_echoes(base: str) -> None:
    body = {"model": "anything", "max_tokens": 3,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three four"}]}
    reply = httpx.post(f"{base}/v1/chat/completions", json=body).json()
    assert reply["model"] == "tiny-echo" and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo: one two"}
    assert reply["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


def test_streamed_chat_completion(base: str) -> None:
    body = {"model": "tiny-echo", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hi there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", b"{nope", 400),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
    ("POST", "/v1/embeddings", b"{}", 404),
    ("GET", "/metrics", None, 404),
])
def test_errors_are_openai_shaped(base: str, method: str, path: str, body: bytes | None, status: int) -> None:
    response = httpx.request(method, f"{base}{path}", content=body)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
