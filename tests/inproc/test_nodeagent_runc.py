"""The nodeagent in process: real etcd, real runc, the real model server in its container."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.server import serve
from snapwake import keys
from snapwake.etcd import Etcd
from snapwake.grpcserver import channel
from snapwake.testing import EtcdProcess, free_port
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.inproc.test_nodeagent_support import runc_ids, start_request

pytestmark = [pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
              pytest.mark.timeout(240)]


@dataclass
class Node:
    config: NodeAgentConfig
    stub: nodeagent_pb2_grpc.NodeAgentServiceStub
    store: Etcd


@pytest.fixture
async def node(etcd_server: EtcdProcess) -> AsyncIterator[Node]:
    # A short state dir: Unix socket paths (instance control sockets) are limited to 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="swna-", dir="/tmp"))
    config = NodeAgentConfig(
        name=f"node-{state.name[5:].lower()}", listen="127.0.0.1:0", etcd=etcd_server.address, etcd_plaintext=True,
        blobstore=f"127.0.0.1:{free_port()}", handover_socket=str(state / "hs" / "handover.sock"),
        state_dir=str(state), gpus="none", reconcile_interval=0.5, ended_linger=2.0)
    try:
        async with serve(config) as running, Etcd.connect(etcd_server.address) as store:
            chan = channel(f"127.0.0.1:{running.port}")
            yield Node(config, nodeagent_pb2_grpc.NodeAgentServiceStub(chan), store)
            await chan.close()
        assert runc_ids(config.runc_root) == [], "shutdown left containers behind"
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def _instance(store: Etcd, instance_id: str) -> types_pb2.Instance | None:
    """The instance's record, whichever node wrote it."""
    entry = next((e for e in await store.list(keys.INSTANCES, types_pb2.Instance)
                  if e.value.id == instance_id), None)  # type: ignore[attr-defined]
    return None if entry is None else entry.value  # type: ignore[return-value]


async def test_node_is_registered_under_a_lease(node: Node) -> None:
    entry = await node.store.get(keys.node_key(node.config.name), types_pb2.Node)
    assert entry is not None
    assert entry.value.address == node.config.listen  # type: ignore[attr-defined]
    assert entry.value.host_memory_bytes > 0  # type: ignore[attr-defined]
    assert entry.lease != 0


async def test_start_running_serves_then_stops(node: Node, demo_model_dir: Path) -> None:
    iid = "i-00000000a001"
    resp = await node.stub.StartInstance(start_request(iid, demo_model_dir), timeout=120)
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING
    stored = await _instance(node.store, iid)
    assert stored is not None and stored.state in (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE)
    assert stored.endpoint == resp.instance.endpoint and stored.node == node.config.name

    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(f"http://{stored.endpoint}/v1/chat/completions", json={
            "model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "demo" and body["choices"][0]["message"]["role"] == "assistant"

    for _ in range(40):  # the reconcile loop (every 0.5 s) reads the container's smaps_rollup
        stored = await _instance(node.store, iid)
        if stored is not None and stored.host_private_bytes:
            break
        await asyncio.sleep(0.25)
    assert stored is not None
    assert 0 < stored.host_private_bytes <= stored.host_pss_bytes <= stored.host_rss_bytes, stored

    logs = await node.stub.GetInstanceLogs(nodeagent_pb2.NodeAgentServiceGetInstanceLogsRequest(instance_id=iid), timeout=10)
    assert logs.logs.strip()

    listed = await node.stub.ListInstances(nodeagent_pb2.NodeAgentServiceListInstancesRequest(), timeout=10)
    assert [i.id for i in listed.instances] == [iid]

    await node.stub.StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id=iid), timeout=30)
    assert runc_ids(node.config.runc_root) == []
    stored = await _instance(node.store, iid)
    assert stored is None or stored.state == InstanceState.INSTANCE_STATE_ENDED
    for _ in range(40):  # the ENDED key lingers for ended_linger (2 s), then goes
        if await _instance(node.store, iid) is None:
            break
        await asyncio.sleep(0.25)
    assert await _instance(node.store, iid) is None


async def test_a_container_that_dies_later_is_failed_with_its_exit_status(node: Node, demo_model_dir: Path) -> None:
    iid = "i-00000000a002"
    await node.stub.StartInstance(start_request(iid, demo_model_dir), timeout=120)
    await asyncio.to_thread(subprocess.run, ["runc", "--root", str(node.config.runc_root), "kill", "sw-" + iid, "KILL"],
                            check=True, capture_output=True, timeout=20)
    for _ in range(60):  # the reconcile loop runs every 0.5 s; it marks FAILED, then deletes the container
        stored = await _instance(node.store, iid)
        if stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED \
                and runc_ids(node.config.runc_root) == []:
            break
        await asyncio.sleep(0.25)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert "container exited unexpectedly (exit status 137)" in stored.message  # 128 + SIGKILL, from runc run
    assert runc_ids(node.config.runc_root) == []


async def test_failed_start_reports_reason_and_cleans_up(node: Node, demo_model_dir: Path, tmp_path: Path) -> None:
    iid = "i-00000000b002"
    broken = tmp_path / "no-config"  # the demo model without its config.json
    shutil.copytree(demo_model_dir, broken, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.StartInstance(start_request(iid, broken, timeout_s=60), timeout=90)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert details.startswith("start failed: ") and "config.json" in details
    stored = await _instance(node.store, iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert "config.json" in stored.message
    assert runc_ids(node.config.runc_root) == []


async def test_start_times_out(node: Node, demo_model_dir: Path) -> None:
    iid = "i-00000000c003"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.StartInstance(start_request(iid, demo_model_dir, timeout_s=1), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "within 1s" in (caught.value.details() or "")
    stored = await _instance(node.store, iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert runc_ids(node.config.runc_root) == []


@pytest.mark.parametrize(("mutate", "code", "needle"), [
    (lambda r: setattr(r, "instance_id", "bad id"), grpc.StatusCode.INVALID_ARGUMENT, "instance_id"),
    (lambda r: setattr(r, "target", 0), grpc.StatusCode.INVALID_ARGUMENT, "target"),
    (lambda r: setattr(r.spec, "model_dir", "/nonexistent/model"), grpc.StatusCode.INVALID_ARGUMENT, "spec.model_dir"),
    (lambda r: setattr(r.spec, "image", "docker.io/x"), grpc.StatusCode.INVALID_ARGUMENT, "spec.image"),
    (lambda r: setattr(r, "function_id", "nope"), grpc.StatusCode.INVALID_ARGUMENT, "function_id"),
])
async def test_bad_start_requests(node: Node, tmp_path: Path, mutate, code: grpc.StatusCode, needle: str) -> None:
    req = start_request("i-00000000d004", tmp_path)
    mutate(req)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await node.stub.StartInstance(req, timeout=10)
    assert caught.value.code() == code and needle in (caught.value.details() or "")


@pytest.mark.parametrize("call", ["logs", "stop", "suspend", "restore"])
async def test_unknown_instance_is_not_found(node: Node, call: str) -> None:
    iid = "i-ffffffffffff"
    rpc = {"logs": lambda: node.stub.GetInstanceLogs(nodeagent_pb2.NodeAgentServiceGetInstanceLogsRequest(instance_id=iid)),
           "stop": lambda: node.stub.StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id=iid)),
           "suspend": lambda: node.stub.SuspendInstance(nodeagent_pb2.SuspendInstanceRequest(instance_id=iid)),
           "restore": lambda: node.stub.RestoreInstance(nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc[call]()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert iid in (caught.value.details() or "")
