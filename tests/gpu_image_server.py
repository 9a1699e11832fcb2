"""A user image's server that holds GPU memory in two processes (for the ``-m gpu`` user-image tests).

Only the standard library and ``cuda.bindings`` (the driver comes from the node, as the NVIDIA
container toolkit gives it). At start the server fills ``--mib`` MiB of device memory with one
byte value and starts a worker process that fills its own ``--mib`` MiB with another; then it
serves, on ``--port``:

    GET  /health                 200
    GET  /v1/models              the served model
    POST /v1/chat/completions    checks both processes' device memory byte for byte and answers
                                 "parent=ok child=ok" (or "bad") as an OpenAI chat completion

So a driver checkpoint of only one of the two processes, or a restore that lost data, shows in
the answer. ``--worker`` runs the worker (it answers "ok"/"bad" per line on stdin).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from cuda.bindings import driver as cu


def _check(result: Any) -> Any:
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise RuntimeError(f"CUDA call failed: {status}")
    return values[0] if len(values) == 1 else values


class Block:
    """``size`` bytes of device memory holding ``value`` in every byte."""

    def __init__(self, size: int, value: int) -> None:
        _check(cu.cuInit(0))
        self.ctx = _check(cu.cuDevicePrimaryCtxRetain(_check(cu.cuDeviceGet(0))))
        _check(cu.cuCtxSetCurrent(self.ctx))
        self.size, self.value = size, value
        self.ptr = _check(cu.cuMemAlloc(size))
        _check(cu.cuMemsetD8(self.ptr, value, size))
        _check(cu.cuCtxSynchronize())

    def intact(self) -> bool:
        _check(cu.cuCtxSetCurrent(self.ctx))
        host = bytearray(self.size)
        _check(cu.cuMemcpyDtoH(host, self.ptr, self.size))
        return host == bytes([self.value]) * self.size


def worker(mib: int) -> None:
    block = Block(mib << 20, 0x5A)
    print("ready", flush=True)
    for _ in sys.stdin:
        print("ok" if block.intact() else "bad", flush=True)


def serve(port: int, mib: int, model: str) -> None:
    block = Block(mib << 20, 0xA5)
    child = subprocess.Popen([sys.executable, __file__, "--worker", "--mib", str(mib)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit("the worker did not start")

    def ask_child() -> str:
        assert child.stdout is not None and child.stdin is not None
        child.stdin.write("check\n")
        child.stdin.flush()
        return child.stdout.readline().strip() or "gone"

    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            text = f"parent={'ok' if block.intact() else 'bad'} child={ask_child()}"
            self._json(200, {"id": "chatcmpl-gpu", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", model), "choices": [{
                                 "index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

        def log_message(self, *args: Any) -> None:
            pass

    print(f"serving on {port}", flush=True)
    HTTPServer(("0.0.0.0", port), Handler).serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--served-model-name", default="gpu-model")
    p.add_argument("--worker", action="store_true")
    opts = p.parse_args()
    if opts.worker:
        worker(opts.mib)
    else:
        serve(opts.port, opts.mib, opts.served_model_name)


if __name__ == "__main__":
    main()
