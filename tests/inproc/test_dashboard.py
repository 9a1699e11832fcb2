"""The dashboard's JSON endpoint and error state, under httpx's ASGI transport."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.gateway.dashboard import build_app, build_state
from snapwake import errors
from snapwake.v1 import types_pb2 as t

GiB = 1 << 30


class FakeClient:
    """The admin lists a small cluster would return; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.down: Exception | None = None
        spec = t.FunctionSpec(resources=t.Resources(gpu_memory_bytes=20 * GiB))
        self.functions = [t.Function(id="acme/default/llama", revision=2, state=t.FUNCTION_STATE_READY, spec=spec),
                          t.Function(id="acme/default/tiny", revision=1, state=t.FUNCTION_STATE_PENDING)]
        self.instances = [
            t.Instance(id="i-00000000000a", function_id="acme/default/llama", node="n1", gpu_index=0,
                       gpu_memory_bytes=20 * GiB, state=t.INSTANCE_STATE_RUNNING, last_start_seconds=0.41,
                       update_time=Timestamp(seconds=1000)),
            t.Instance(id="i-00000000000b", function_id="acme/default/llama", node="n1", gpu_index=0,
                       gpu_memory_bytes=20 * GiB, state=t.INSTANCE_STATE_STANDBY),
            t.Instance(id="i-00000000000c", function_id="acme/default/llama", node="n1", gpu_index=1,
                       gpu_memory_bytes=20 * GiB, state=t.INSTANCE_STATE_IDLE, last_start_seconds=0.38,
                       update_time=Timestamp(seconds=2000))]
        self.nodes = [t.Node(name="n1", address="10.0.0.1:7001", heartbeat_time=Timestamp(seconds=2990),
                             cached_snapshots=["acme/default/llama@2"],
                             gpus=[t.Gpu(index=0, name="H100", memory_total_bytes=80 * GiB),
                                   t.Gpu(index=1, name="H100", memory_total_bytes=80 * GiB)])]
        self.snapshots = [t.Snapshot(id="acme/default/llama@2", function_id="acme/default/llama", revision=2,
                                     state=t.SNAPSHOT_STATE_READY, disk_nodes=["n1", "n2"], cache_nodes=["n1"]),
                          t.Snapshot(id="acme/default/tiny@1", function_id="acme/default/tiny", revision=1,
                                     state=t.SNAPSHOT_STATE_BUILDING, bytes_written=5, total_bytes=10)]

    async def _answer(self, value: Sequence) -> Sequence:
        await asyncio.sleep(0)
        if self.down is not None:
            raise self.down
        return value

    async def list_functions(self) -> Sequence[t.Function]:
        return await self._answer(self.functions)

    async def list_instances(self) -> Sequence[t.Instance]:
        return await self._answer(self.instances)

    async def list_nodes(self) -> Sequence[t.Node]:
        return await self._answer(self.nodes)

    async def list_snapshots(self) -> Sequence[t.Snapshot]:
        return await self._answer(self.snapshots)


def test_build_state_groups_slices_and_cold_starts() -> None:
    c = FakeClient()
    st = build_state(c.functions, c.instances, c.nodes, c.snapshots, now=3000.0)
    llama, tiny = st["functions"]
    assert llama["instances_by_state"] == {"RUNNING": 1, "STANDBY": 1, "IDLE": 1}
    assert tiny["instances_by_state"] == {} and tiny["state"] == "PENDING"
    gpu0, gpu1 = st["nodes"][0]["gpus"]
    assert [s["instance_id"] for s in gpu0["slices"]] == ["i-00000000000a"]  # the standby holds no GPU
    assert [s["state"] for s in gpu1["slices"]] == ["IDLE"]
    assert st["nodes"][0]["heartbeat_age_seconds"] == 10.0
    assert [(s["id"], s["tier"]) for s in st["snapshots"]] == [("acme/default/llama@2", "cache"),
                                                               ("acme/default/tiny@1", "none")]
    assert [c["instance_id"] for c in st["cold_starts"]] == ["i-00000000000c", "i-00000000000a"]  # newest first


async def test_state_endpoint_reports_outage_and_recovers() -> None:
    client = FakeClient()
    transport = httpx.ASGITransport(app=build_app(client, timeout=1.0))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        page = await http.get("/")
        assert page.status_code == 200 and "api/state" in page.text
        ok = await http.get("/api/state")
        assert ok.status_code == 200 and ok.json()["ok"] is True
        assert ok.json()["functions"][0]["id"] == "acme/default/llama"
        client.down = errors.Unavailable("connection refused")
        bad = await http.get("/api/state")
        assert bad.status_code == 503
        assert bad.json() == {"ok": False, "error": "scheduler unreachable: connection refused",
                              "time": pytest.approx(bad.json()["time"])}
        client.down = None
        again = await http.get("/api/state")
        assert again.status_code == 200 and len(again.json()["snapshots"]) == 2


async def test_state_endpoint_bounds_a_hung_scheduler() -> None:
    client = FakeClient()

    async def hang() -> Sequence[t.Node]:
        await asyncio.sleep(30)
        return []

    client.list_nodes = hang  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=build_app(client, timeout=0.2))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        resp = await asyncio.wait_for(http.get("/api/state"), 5)
    assert resp.status_code == 503 and "no answer within 0.2s" in resp.json()["error"]
