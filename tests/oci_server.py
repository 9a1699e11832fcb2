"""A stand-in user inference server: stdlib only, OpenAI-shaped, deterministic. It is NOT our
model server; tests put it into a Debian image as /srv/server.py (tests/oci_image.py).

    GET  /health                200 {"status": "ok"}
    GET  /v1/models             the one served model
    POST /v1/chat/completions   "echo: " + the last user message, cut to max_tokens words;
                                with "stream": true as server-sent events ending in [DONE]

Any "model" is accepted and answered as the served name (as vLLM does with one model).
Usage: python3 server.py [--host 0.0.0.0] [--port 8000] [--model NAME]; PORT and
SERVED_MODEL_NAME are the defaults' defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CREATED = 1_700_000_000


def reply_words(body: dict[str, Any]) -> list[str]:
    """The answer's words: "echo:" and the last user message's, at most max_tokens of them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    words = ["echo:", *str(content).split()]
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    return words[: int(limit)] if isinstance(limit, int) and limit > 0 else words


def completion(model: str, words: list[str], prompt_words: int) -> dict[str, Any]:
    return {"id": "chatcmpl-echo", "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(words),
                      "total_tokens": prompt_words + len(words)}}


def chunks(model: str, words: list[str], usage: bool, prompt_words: int) -> list[dict[str, Any]]:
    """The streamed chunks: the role, one word each, the finish reason, optionally the usage."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": (" " if i else "") + w}) for i, w in enumerate(words)]
    out.append(chunk({}, "stop"))
    if usage:
        out.append({"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": CREATED, "model": model,
                    "choices": [], "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(words),
                                             "total_tokens": prompt_words + len(words)}})
    return out


class Handler(BaseHTTPRequestHandler):
    model = "echo-model"

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": CREATED, "owned_by": "snapwake-tests"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if not isinstance(body, dict):
                raise ValueError("body: expected a JSON object")
            words = reply_words(body)
        except ValueError as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body["messages"] if isinstance(m, dict))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(chunks(self.model, words, usage, prompt_words))
        else:
            self._json(200, completion(self.model, words, prompt_words))

    def _stream(self, events: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--model", default=os.environ.get("SERVED_MODEL_NAME", "echo-model"))
    args = parser.parse_args(argv)
    Handler.model = args.model
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"serving {args.model} on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
