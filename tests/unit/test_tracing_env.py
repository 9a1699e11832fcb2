"""The nodeagent hands its OTEL_* settings on to containers, never its own service name."""

from __future__ import annotations

import pytest

from services.nodeagent.__main__ import tracing_env
from services.nodeagent.config import NodeAgentConfig


@pytest.mark.parametrize("env, expected", [
    ({}, ()),
    ({"PATH": "/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ("OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4317",)),
    ({"OTEL_SERVICE_NAME": "snapwake-nodeagent", "OTEL_RESOURCE_ATTRIBUTES": "a=1,b=2"},
     ("OTEL_RESOURCE_ATTRIBUTES=a=1,b=2",)),
])
def test_tracing_env(env: dict[str, str], expected: tuple[str, ...]) -> None:
    assert tracing_env(env) == expected


@pytest.mark.parametrize("items, bad", [
    (("A=1", "B=x=y"), []),
    (("NOVALUE",), ["container_env: expected KEY=VALUE, got 'NOVALUE'"]),
    (("=v",), ["container_env: expected KEY=VALUE, got '=v'"]),
])
def test_container_env_is_validated(items: tuple[str, ...], bad: list[str]) -> None:
    problems = NodeAgentConfig(container_env=items).validate()
    assert [p for p in problems if p.startswith("container_env")] == bad


@pytest.mark.parametrize("port, ok", [(0, True), (9102, True), (70000, False), (-1, False)])
def test_metrics_port_range(port: int, ok: bool) -> None:
    problems = [p for p in NodeAgentConfig(metrics_port=port).validate() if p.startswith("metrics_port")]
    assert (not problems) is ok
