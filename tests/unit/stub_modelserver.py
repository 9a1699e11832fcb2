"""A stand-in for the model server in the nodeagent's unit tests: its side of docs/CONTRACTS.md
(``GET /health`` on ``--port``, the JSON-lines control socket, any POST answered 200) with no
model behind it, in the standard library only, so it starts in milliseconds.

Run as the container's ``python`` (``stub -m modelserver --port ... --control-socket ...``).
The environment (the function spec's ``env``) picks its behaviour:
    STUB_BEHAVIOUR   serve (default) | exit (print a reason, exit 1) | hang (never ready) |
                     hog (serve; a second after the first health check, fill memory until killed) |
                     hog-at-start (fill memory until killed, never ready)
    STUB_INFLIGHT    the ``inflight`` count control ``status`` reports (default 0)
    STUB_FAIL_<OP>   answer control op OP with {"ok": false, "error": <value>}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


async def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--port", "--start-mode", "--control-socket"):
        parser.add_argument(flag)
    args, _ = parser.parse_known_args()
    behaviour = os.environ.get("STUB_BEHAVIOUR", "serve")
    if behaviour == "exit":
        print("stub: model_dir has no config.json", flush=True)
        sys.exit(1)
    if behaviour == "hang":
        await asyncio.sleep(3600)
    state = {"phase": "released" if args.start_mode == "standby" else "serving"}
    hogging: list[asyncio.TimerHandle] = []

    def hog() -> None:
        held = []
        while True:
            held.append(b"\x01" * (8 << 20))  # written, so every page is charged

    if behaviour == "hog-at-start":
        hog()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        await reader.readexactly(length)
        ok = head.startswith("POST") or state["phase"] == "serving"
        if behaviour == "hog" and ok and not hogging:
            hogging.append(asyncio.get_running_loop().call_later(1.0, hog))
        body = json.dumps({"phase": state["phase"]}).encode()
        writer.write(b"HTTP/1.1 %d -\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (200 if ok else 503, len(body), body))
        await writer.drain()
        writer.close()

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        op = json.loads(await reader.readline())["op"]
        reply: dict[str, object] = {"ok": True}
        if op == "status":
            reply.update(phase=state["phase"], inflight=int(os.environ.get("STUB_INFLIGHT", "0")), pid=os.getpid())
        elif op == "release":
            state["phase"] = "released"
        elif op == "attach":
            state["phase"] = "serving"
            reply.update(bytes=1234, seconds=0.01, dma_seconds=0.005)
        elif op == "snapshot":
            reply.update(bytes=4096, manifest_digest="sha256:stub", seconds=0.01)
        if failure := os.environ.get(f"STUB_FAIL_{op.upper()}"):
            reply = {"ok": False, "error": failure}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        writer.close()

    await asyncio.start_server(http, "127.0.0.1", int(args.port))
    await asyncio.start_unix_server(control, args.control_socket)
    print(f"stub model server serving on {args.port} ({args.start_mode})", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
