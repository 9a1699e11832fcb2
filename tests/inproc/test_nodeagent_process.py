"""The nodeagent as a real process: orphan clean-up after a crash and a clean SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapwake import keys
from snapwake.etcd import Etcd
from snapwake.grpcserver import channel
from snapwake.testing import EtcdProcess, free_port
from snapwake.v1 import nodeagent_pb2_grpc, types_pb2
from tests.inproc.test_nodeagent_support import runc_ids, start_request

pytestmark = [pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
              pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by whoever inherited it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


class Agent:
    """One ``python -m services.nodeagent`` process."""

    def __init__(self, state: Path, name: str, etcd: str) -> None:
        self.port = free_port()
        self.log = state / f"agent-{self.port}.log"
        args = [sys.executable, "-m", "services.nodeagent", "--name", name, "--listen", f"127.0.0.1:{self.port}",
                "--etcd", etcd, "--blobstore", f"127.0.0.1:{free_port()}", "--state-dir", str(state),
                "--handover-socket", str(state / "hs" / "handover.sock"), "--gpus", "none",
                "--reconcile-interval", "0.5", "--etcd-plaintext", "true", "--dev-plaintext"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=out, stdin=subprocess.DEVNULL)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self, limit_s: float = 30.0) -> None:
        chan = channel(self.address)
        stub = health_pb2_grpc.HealthStub(chan)
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    assert self.proc.poll() is None, f"nodeagent exited: {self.log.read_text()[-2000:]}"
                    with contextlib.suppress(Exception):
                        resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if resp.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    await asyncio.sleep(0.2)
        finally:
            await chan.close()

    def stop(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    state = Path(tempfile.mkdtemp(prefix="swnp-", dir="/tmp"))
    yield state
    for cid in runc_ids(state / "runc") if (state / "runc").exists() else []:  # never leave one behind
        subprocess.run(["runc", "--root", str(state / "runc"), "delete", "-f", cid], timeout=20, check=False)
    shutil.rmtree(state, ignore_errors=True)


async def _start(agent: Agent, iid: str, model: Path) -> types_pb2.Instance:
    chan = channel(agent.address)
    try:
        stub = nodeagent_pb2_grpc.NodeAgentServiceStub(chan)
        return (await stub.StartInstance(start_request(iid, model), timeout=120)).instance
    finally:
        await chan.close()


def _pid(root: Path, cid: str) -> int:
    out = subprocess.run(["runc", "--root", str(root), "state", cid], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    return int(json.loads(out)["pid"])


async def test_crash_leaves_orphans_that_the_next_run_removes(
        state_dir: Path, etcd_server: EtcdProcess, demo_model_dir: Path) -> None:
    name, root = f"node-{state_dir.name[5:].lower()}", state_dir / "runc"
    first = Agent(state_dir, name, etcd_server.address)
    try:
        await first.ready()
        await _start(first, "i-00000000e001", demo_model_dir)
    finally:
        first.stop(signal.SIGKILL)  # a crash: nothing gets cleaned up
    assert runc_ids(root) == ["sw-i-00000000e001"]
    orphan_pid = _pid(root, "sw-i-00000000e001")
    assert _alive(orphan_pid)

    second = Agent(state_dir, name, etcd_server.address)
    try:
        await second.ready()
        assert runc_ids(root) == []
        assert not _alive(orphan_pid)
        assert not (state_dir / "instances" / "i-00000000e001").exists()
        async with Etcd.connect(etcd_server.address) as store:
            assert await store.get(keys.instance_key(name, "i-00000000e001"), types_pb2.Instance) is None
            assert await store.get(keys.node_key(name), types_pb2.Node) is not None
            inst = await _start(second, "i-00000000e002", demo_model_dir)
            assert inst.state == types_pb2.INSTANCE_STATE_RUNNING
            assert second.stop(signal.SIGTERM) == 0  # graceful: containers stopped, lease revoked
            assert runc_ids(root) == []
            assert await store.get(keys.instance_key(name, "i-00000000e002"), types_pb2.Instance) is None
            assert await store.get(keys.node_key(name), types_pb2.Node) is None
    finally:
        second.stop(signal.SIGKILL)
