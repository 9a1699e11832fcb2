"""What the nodeagent's forwarder costs: one small HTTP server, reached directly on the host's
loopback and through a ``Forwarder`` into a sandbox container's network namespace.

    sudo .venv/bin/python -m bench.forward_overhead [requests]

Writes ``bench/results/forward-overhead-cpu.json`` and prints the median and p99 of a keep-alive request, of a request on a new connection, and the
time to stream 1000 SSE events, three ways: a server on the host's loopback; the same server in
a sandbox container, dialled from a socket made in its namespace (what the sandbox costs:
seccomp, the CPU quota); and through the forwarder (what the forwarder adds on top).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.nodeagent.bundle import IdMap, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import bundle_spec, make_work_dir
from services.nodeagent.containers import RuncContainers
from services.nodeagent.forward import Forwarder, NetNs
from services.nodeagent.machine import StartPlan
from snapwake.v1 import nodeagent_pb2, types_pb2

SERVER = r"""
import asyncio, sys
async def handle(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        if head.startswith(b"GET /sse"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for i in range(1000):
                writer.write(b"data: {\"token\": %d}\n\n" % i)
                await writer.drain()
            break
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    writer.close()
async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(REQUEST)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def measure(open_: Opener, n: int) -> dict[str, float]:
    keep: list[float] = []
    reader, writer = await open_()
    for _ in range(n):
        t = time.perf_counter()
        await _one(reader, writer)
        keep.append(time.perf_counter() - t)
    writer.close()
    fresh: list[float] = []
    for _ in range(n // 4):
        t = time.perf_counter()
        reader, writer = await open_()
        await _one(reader, writer)
        fresh.append(time.perf_counter() - t)
        writer.close()
    reader, writer = await open_()
    t = time.perf_counter()
    writer.write(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await reader.read()
    sse = time.perf_counter() - t
    assert body.count(b"data: ") == 1000
    ms = lambda xs, q: 1000 * statistics.quantiles(xs, n=100)[q - 1]  # noqa: E731
    return {"keepalive_p50_ms": ms(keep, 50), "keepalive_p99_ms": ms(keep, 99),
            "new_conn_p50_ms": ms(fresh, 50), "new_conn_p99_ms": ms(fresh, 99), "sse_1000_events_ms": 1000 * sse}


def _state() -> Path:
    state = Path(tempfile.mkdtemp(prefix="swfo-", dir="/tmp"))
    state.chmod(0o711)
    (state / "model").mkdir()
    (state / "instances").mkdir(mode=0o711)
    return state


def _ready(log: Path) -> bool:
    return log.exists() and "ready" in log.read_text()


async def main(n: int) -> None:
    state = _state()
    config = NodeAgentConfig(state_dir=str(state), handover_socket=str(state / "h.sock"))
    runc = RuncContainers(config.runc_root, prefix="fo-")
    direct = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVER, "18123", stdout=asyncio.subprocess.PIPE)
    try:
        assert direct.stdout is not None
        await direct.stdout.readline()
        idir = config.instances_dir / "i-00000000f0f0"
        idir.mkdir()
        make_work_dir(idir, IdMap())
        req = nodeagent_pb2.StartInstanceRequest(instance_id="i-00000000f0f0", function_id="a/b/c", revision=1,
                                                 spec=types_pb2.FunctionSpec(model_dir=str(state / "model")))
        spec = dataclasses.replace(bundle_spec(config, req, StartPlan.RUNNING, 8000, idir, None),
                                   args=(sys.executable, "-c", SERVER, "8000"))
        pid = await runc.run("fo-1", write_bundle(idir / "bundle", spec), idir / "output.log")
        for _ in range(400):
            if _ready(idir / "output.log"):
                break
            await asyncio.sleep(0.05)
        fwd = Forwarder("127.0.0.1", 8000)
        await fwd.start()
        fwd.attach(NetNs.of_pid(pid))
        netns = NetNs.of_pid(pid)

        async def inside() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(sock=await netns.connect(8000))

        paths: dict[str, Opener] = {
            "host_loopback": lambda: asyncio.open_connection("127.0.0.1", 18123),
            "container_netns_no_forwarder": inside,
            "container_via_forwarder": lambda: asyncio.open_connection("127.0.0.1", fwd.port)}
        for open_ in paths.values():  # warm every path
            await measure(open_, n // 10)
        report = {name: await measure(open_, n) for name, open_ in paths.items()}
        netns.close()
        print(json.dumps(report, indent=1))
        out = Path(__file__).parent / "results" / "forward-overhead-cpu.json"
        out.write_text(json.dumps({"machine": f"{platform.node()} ({os.cpu_count()} CPUs, no GPU)",
                                   "requests": n, "baseline": "host_loopback", "report": report}, indent=1) + "\n")
        await fwd.close()
    finally:
        direct.kill()
        await runc.delete("fo-1")
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
