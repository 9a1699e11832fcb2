"""The node re-exports its built-in instances' metrics with their instance and function."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from modelserver.metrics import ServerMetrics
from services.nodeagent.modelmetrics import ModelServerMetrics
from snapwake.v1 import types_pb2


class _Engine:
    def load(self) -> dict[str, int]:
        return {"running": 2, "waiting": 1, "kv_used": 5, "kv_total": 8}


class _Instance:
    engine = _Engine()


def test_running_instances_are_relabelled_and_the_silent_ones_left_out() -> None:
    server = ServerMetrics(_Instance())
    server.generation_tokens.inc(7)
    server.ttft.observe(0.2)
    text = generate_latest(server.registry).decode() + "python_gc_objects_collected_total 3\n"

    def fetch(endpoint: str, timeout: float) -> str:
        if endpoint == "10.0.0.1:1":
            return text
        raise httpx.ConnectTimeout("slow")

    instances = [types_pb2.Instance(id="i-a", function_id="t/n/a", endpoint="10.0.0.1:1",
                                    state=types_pb2.INSTANCE_STATE_RUNNING),
                 types_pb2.Instance(id="i-b", function_id="t/n/b", endpoint="10.0.0.2:1",
                                    state=types_pb2.INSTANCE_STATE_IDLE),
                 types_pb2.Instance(id="i-c", function_id="t/n/c", endpoint="10.0.0.1:1",
                                    state=types_pb2.INSTANCE_STATE_STANDBY)]
    registry = CollectorRegistry()
    registry.register(ModelServerMetrics(lambda: instances, fetch=fetch))
    out = generate_latest(registry).decode()
    labels = 'function_id="t/n/a",instance_id="i-a"'
    assert f"snapwake_model_generation_tokens_total{{{labels}}} 7.0" in out
    assert f"snapwake_model_requests_running{{{labels}}} 2.0" in out
    assert f"snapwake_model_kv_blocks_used{{{labels}}} 5.0" in out
    assert "snapwake_model_ttft_seconds_count{" in out and "i-b" not in out and "i-c" not in out
    assert "python_gc" not in out  # only the model server's own families
