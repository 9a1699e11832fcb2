"""The per-instance forwarder's traffic record (what tells a user image's RUNNING from IDLE):
open connections and when bytes last moved. FakeContainers share the host's network namespace,
so the forwarder is attached to ours (``own=False``) and carries to a plain server here; the
namespaced path is in tests/inproc/test_sandbox.py."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest

from services.nodeagent.forward import Forwarder, NetNs, Traffic

pytestmark = pytest.mark.timeout(30)


async def _until(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo:" + line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    fwd = Forwarder("127.0.0.1", server.sockets[0].getsockname()[1], idle_timeout=30)
    await fwd.start()
    fwd.attach(NetNs.of_pid(os.getpid(), own=False))
    try:
        yield fwd
    finally:
        await fwd.close()
        server.close()


async def test_traffic_counts_connections_and_stamps_moved_bytes_only(forwarder: Forwarder) -> None:
    made = forwarder.traffic()
    assert made.connections == 0 and made.last_moved <= time.monotonic()  # the creation time, before any byte

    reader, writer = await asyncio.open_connection("127.0.0.1", forwarder.port)
    await _until(lambda: forwarder.traffic().connections == 1)
    assert forwarder.traffic().last_moved == made.last_moved  # an open connection moves nothing

    before = time.monotonic()
    writer.write(b"hello\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 5) == b"echo:hello\n"
    spoke = forwarder.traffic()
    assert spoke.connections == 1 and before <= spoke.last_moved <= time.monotonic()

    await asyncio.sleep(0.2)  # open and silent, as a keep-alive connection between requests
    assert forwarder.traffic() == Traffic(1, spoke.last_moved)

    writer.close()
    await _until(lambda: forwarder.traffic().connections == 0)
    assert time.monotonic() - forwarder.traffic().last_moved >= 0.2 - 0.01


async def test_traffic_spans_every_connection(forwarder: Forwarder) -> None:
    first = await asyncio.open_connection("127.0.0.1", forwarder.port)
    second = await asyncio.open_connection("127.0.0.1", forwarder.port)
    await _until(lambda: forwarder.traffic().connections == 2)
    stamps = []
    for reader, writer in (first, second, first):
        writer.write(b"x\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"echo:x\n"
        stamps.append(forwarder.traffic().last_moved)
    assert stamps == sorted(stamps) and len(set(stamps)) == 3  # either connection moves the one stamp
    for _, writer in (first, second):
        writer.close()
    await _until(lambda: forwarder.traffic().connections == 0)
