"""The model server's traces leave its network namespace through one relay socket: which
collector endpoints are relayed, and the relay itself carrying bytes both ways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.nodeagent.container import OTLP_SOCKET, otlp_env, otlp_relay_target
from services.nodeagent.forward import TelemetryRelay


@pytest.mark.parametrize(("env", "target"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, ("127.0.0.1", 4317)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, ("collector", 4317)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2"}, ("b", 2)),
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317"}, None),  # TLS: not relayed
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector"}, None),  # no port
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:99999"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, None),
])
def test_which_collectors_are_relayed(env: dict[str, str], target: tuple[str, int] | None) -> None:
    assert otlp_relay_target(env) == target


def test_the_container_dials_its_relay_socket(tmp_path: Path) -> None:
    env = otlp_env(tmp_path)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"unix://{tmp_path / OTLP_SOCKET}"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == env["OTEL_EXPORTER_OTLP_ENDPOINT"]


async def test_the_relay_carries_bytes_to_the_collector_and_back(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"collector:" + await reader.readline())
        await writer.drain()
        writer.close()

    collector = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = collector.sockets[0].getsockname()[1]
    relay = TelemetryRelay(tmp_path / OTLP_SOCKET, "127.0.0.1", port, idle_timeout=5)
    await relay.start()
    try:
        assert (tmp_path / OTLP_SOCKET).stat().st_mode & 0o777 == 0o666
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / OTLP_SOCKET))
        writer.write(b"spans\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b"collector:spans\n"
        writer.close()
    finally:
        await relay.close()
        collector.close()
    assert not (tmp_path / OTLP_SOCKET).exists()
