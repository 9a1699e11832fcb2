"""A stand-in for a user image's OpenAI server in the nodeagent's unit tests, standard library
only: ``GET /health`` and ``/v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions``
answering only the model named by ``--served-model-name`` (anything else is a 404, as vLLM does).

It listens on ``$PORT`` (the test's sandbox puts the node port there, since FakeContainers run
it on the host). ``--mode`` picks its behaviour:
    serve         (default)
    no-health     /health is 404: the node falls back to /v1/models
    exit          print a traceback-like reason and exit 3 at once
    never-listen  run without ever opening the port
    refuse-warmup answer every POST with 400
    worker        serve, with a second process in the container (as vLLM's engine core)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="serve")
    parser.add_argument("--served-model-name", default="stub")
    args = parser.parse_args()
    if args.mode == "exit":
        print("Traceback (most recent call last):\nRuntimeError: CUDA driver not found", flush=True)
        sys.exit(3)
    if args.mode == "never-listen":
        print("loading a model that never finishes loading", flush=True)
        time.sleep(3600)
    if args.mode == "worker":  # in the container's session: it goes with the container
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    posts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/v1/models":
                self._answer(200, {"object": "list", "data": [{"id": args.served_model_name, "object": "model"}],
                                   "posts": posts})
            elif self.path == "/health" and args.mode != "no-health":
                self._answer(200, {"status": "ok"})
            else:
                self._answer(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            posts.append(f"{self.path} {body.get('model')} stream={body.get('stream')}")
            if args.mode == "refuse-warmup":
                self._answer(400, {"error": {"message": "chat template missing"}})
            elif body.get("model") != args.served_model_name:
                self._answer(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            else:
                self._answer(200, {"id": "x", "object": "chat.completion", "model": args.served_model_name,
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    print(f"serving {args.served_model_name} on {server.server_address}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
