"""Snapshot, standby, restore and suspend with the real blobstore (a subprocess), real runc
and real etcd, on the CPU path (memfd arena handed over the blobstore's socket)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.server import serve
from snapwake import keys
from snapwake.etcd import Etcd
from snapwake.grpcserver import channel
from snapwake.testing import EtcdProcess, free_port
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.inproc.test_nodeagent_support import FUNCTION_ID, runc_ids, start_request

pytestmark = [pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
              pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "services/blobstore/__main__.py").exists(),
                                 reason="the blobstore is not written yet"),
              pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def _tail(log: Path) -> str:
    return log.read_text()[-2000:]


def _spawn_blobstore(address: str, state: Path, handover: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.blobstore", "--listen", address,
                                 "--dirs", f"{state}/d0,{state}/d1", "--handover-socket", str(handover),
                                 "--gpu", "false", "--dev-plaintext"], cwd=REPO, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)


async def _healthy(address: str, proc: subprocess.Popen[bytes], log: Path, limit_s: float = 30.0) -> None:
    chan = channel(address)
    try:
        async with asyncio.timeout(limit_s):
            while True:
                assert proc.poll() is None, f"blobstore exited: {_tail(log)}"
                with contextlib.suppress(Exception):
                    resp = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
    finally:
        await chan.close()


@pytest.fixture
async def stack(etcd_server: EtcdProcess) -> AsyncIterator[tuple[NodeAgentConfig, nodeagent_pb2_grpc.NodeAgentServiceStub, Etcd]]:
    state = Path(tempfile.mkdtemp(prefix="swns-", dir="/tmp"))
    blob_addr, handover = f"127.0.0.1:{free_port()}", state / "hs" / "handover.sock"
    handover.parent.mkdir(parents=True)
    log = state / "blobstore.log"
    blob = _spawn_blobstore(blob_addr, state, handover, log)
    config = NodeAgentConfig(name=f"node-{state.name[5:].lower()}", listen="127.0.0.1:0", etcd=etcd_server.address,
                             etcd_plaintext=True,
                             blobstore=blob_addr, handover_socket=str(handover), state_dir=str(state),
                             gpus="none", reconcile_interval=0.5, ended_linger=30.0)
    try:
        await _healthy(blob_addr, blob, log)
        async with serve(config) as running, Etcd.connect(etcd_server.address) as store:
            chan = channel(f"127.0.0.1:{running.port}")
            yield config, nodeagent_pb2_grpc.NodeAgentServiceStub(chan), store
            await chan.close()
        assert runc_ids(config.runc_root) == []
    finally:
        blob.terminate()
        blob.wait(20)
        shutil.rmtree(state, ignore_errors=True)


async def _chat(endpoint: str) -> dict:
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(f"http://{endpoint}/v1/chat/completions", json={
            "model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_snapshot_standby_restore_suspend(stack, demo_model_dir: Path) -> None:
    config, stub, store = stack
    revision = zlib.crc32(config.name.encode()) % 1_000_000 + 1  # unique per run: the etcd is shared
    sid = keys.snapshot_id(FUNCTION_ID, revision)

    built = await stub.StartInstance(start_request("i-0000000f0001", demo_model_dir,
                                                   nodeagent_pb2.START_TARGET_SNAPSHOT, revision=revision), timeout=150)
    assert built.instance.state == InstanceState.INSTANCE_STATE_ENDED
    snap = (await store.get(keys.snapshot_key(FUNCTION_ID, revision), types_pb2.Snapshot)).value
    assert snap.state == types_pb2.SNAPSHOT_STATE_READY and snap.bytes_written > 0 and snap.manifest_digest
    assert list(snap.disk_nodes) == [config.name]

    standby = await stub.StartInstance(start_request("i-0000000f0002", demo_model_dir,
                                                     nodeagent_pb2.START_TARGET_STANDBY, revision=revision), timeout=150)
    assert standby.instance.state == InstanceState.INSTANCE_STATE_STANDBY

    for round_ in range(2):
        restored = await stub.RestoreInstance(
            nodeagent_pb2.RestoreInstanceRequest(instance_id="i-0000000f0002"), timeout=60)
        assert restored.instance.state == InstanceState.INSTANCE_STATE_RUNNING, round_
        assert restored.dma_bytes == snap.bytes_written
        assert restored.total_duration.ToNanoseconds() > 0
        assert (await _chat(restored.instance.endpoint))["choices"]
        suspended = await stub.SuspendInstance(
            nodeagent_pb2.SuspendInstanceRequest(instance_id="i-0000000f0002"), timeout=60)
        assert suspended.instance.state == InstanceState.INSTANCE_STATE_STANDBY

    node = (await store.get(keys.node_key(config.name), types_pb2.Node)).value
    for _ in range(40):  # the reconcile loop polls the blobstore's cache
        if sid in node.cached_snapshots:
            break
        await asyncio.sleep(0.25)
        node = (await store.get(keys.node_key(config.name), types_pb2.Node)).value
    assert sid in node.cached_snapshots
    await stub.StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id="i-0000000f0002"), timeout=30)
