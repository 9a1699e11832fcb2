"""Snapshot modes and faults with real processes: etcd, the four services, runc containers, and
the real ``openai`` client through the gateway.

One cluster serves the whole file and the tests run in file order (each leaves the demo
function with a fresh standby). Greedy decoding of the seeded demo model is the referee: a
normal start from the model dir (a SNAPSHOT_MODE_NONE function over the same files) gives the
reference text, and every other path (cold start from the arena snapshot, the process-mode
standby, a rebuilt snapshot, a nodeagent restart) must give exactly that text.

What runs on CPU only: the driver checkpointer is ``NoGpuCheckpointer`` here (no GPU), so the
process-mode test checks the control flow (standby loaded normally and warmed up, restore by
RestoreInstance alone with no blobstore attach, suspend back to STANDBY), not the GPU state
actually moving; that path is measured on the GPU by the benchmark.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from snapwake import keys
from snapwake.devcluster import Cluster, ClusterConfig, deploy_demo
from snapwake.etcd import Etcd
from snapwake.lifecycle import TERMINAL
from snapwake.pki import Identity
from snapwake.testing import wait_for
from snapwake.v1 import (
    blobstore_pb2,
    blobstore_pb2_grpc,
    nodeagent_pb2,
    nodeagent_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    types_pb2,
)
from snapwake.v1.types_pb2 import InstanceState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SERVING = (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE)
DEMO = "default/default/demo"
MESSAGES = [{"role": "user", "content": "hello there"}]


# --- helpers ------------------------------------------------------------------------------

def _admin(cluster: Cluster) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(cluster.admin_channel())


def _agent(cluster: Cluster) -> nodeagent_pb2_grpc.NodeAgentServiceStub:
    return nodeagent_pb2_grpc.NodeAgentServiceStub(cluster.channel_as("nodeagent", Identity("scheduler", "scheduler")))


def _instances(cluster: Cluster, fid: str) -> list[types_pb2.Instance]:
    return list(_admin(cluster).ListInstances(scheduler_pb2.ListInstancesRequest(function_id=fid), timeout=10).instances)


def _snapshot(cluster: Cluster, fid: str = DEMO) -> types_pb2.Snapshot | None:
    found = _admin(cluster).ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=fid), timeout=10).snapshots
    return found[0] if found else None


def _chat(cluster: Cluster, model: str) -> tuple[str, str, str]:
    """(greedy text, claim source, instance id) of one chat completion through the gateway."""
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=8,
                                                           temperature=0)
    text = raw.parse().choices[0].message.content or ""
    return text, raw.headers.get("x-snapwake-claim-source", ""), raw.headers.get("x-snapwake-instance", "")


def _wait_standby(cluster: Cluster, fid: str = DEMO, timeout: float = 90) -> types_pb2.Instance:
    found: list[types_pb2.Instance] = []

    def ready() -> bool:
        found[:] = [i for i in _instances(cluster, fid) if i.state == InstanceState.INSTANCE_STATE_STANDBY]
        return bool(found)

    wait_for(ready, timeout, f"a STANDBY instance of {fid}", interval=0.25)
    return found[0]


def _stop_serving(cluster: Cluster, fid: str = DEMO) -> None:
    """Stops every RUNNING/IDLE instance so the next request needs a start."""
    for inst in _instances(cluster, fid):
        if inst.state in SERVING:
            _agent(cluster).StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id=inst.id), timeout=30)
    wait_for(lambda: not any(i.state in SERVING for i in _instances(cluster, fid)), 20,
             f"no serving instance of {fid}", interval=0.2)


def _runc(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    root = cluster.config.var_dir / "nodeagent" / "runc"
    return subprocess.run(["runc", "--root", str(root), *args], capture_output=True, text=True, timeout=20)


def _containers(cluster: Cluster) -> set[str]:
    return {line for line in _runc(cluster, "list", "-q").stdout.split() if line}


def _create(cluster: Cluster, name: str, model_dir: Path, mode: int, standbys: int) -> types_pb2.Function:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model_dir))
    spec.policy.snapshot_mode = mode  # type: ignore[assignment]
    spec.policy.standby_per_node = standbys
    return _admin(cluster).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10).function


async def _history(etcd: str, prefix: str, cls: type, after_revision: int, until: float) -> list:
    """Every change under ``prefix`` since ``after_revision`` (etcd keeps the history), read
    until the watch has been quiet for a moment or ``until`` seconds pass."""
    events = []
    async with Etcd.connect(etcd) as store:
        stream = store.watch(prefix, cls, start_revision=after_revision + 1).__aiter__()
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            try:
                events.append(await asyncio.wait_for(stream.__anext__(), 1.0))
            except TimeoutError:
                break
        await stream.aclose()
    return events


async def _mod_revision(etcd: str, key: str) -> int:
    async with Etcd.connect(etcd) as store:
        entry = await store.get(key, types_pb2.Snapshot)
        assert entry is not None, key
        return int(entry.mod_revision)


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(demo_model_dir: Path) -> Iterator[Cluster]:
    # A short var dir: control sockets live under it and Unix socket paths stay under 108 chars.
    var = Path(tempfile.mkdtemp(prefix="swf-", dir="/tmp"))
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0,
                           blobstore_port=0, etcd_port=0)
    try:
        with Cluster(config) as c:
            asyncio.run(deploy_demo(c.scheduler_address, demo_model_dir, timeout=240, tls=c.client_tls()))
            yield c
    finally:
        shutil.rmtree(var, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(cluster: Cluster, demo_model_dir: Path) -> str:
    """The greedy text of a normal start: the model read from its safetensors, no snapshot."""
    fn = _create(cluster, "plain", demo_model_dir, types_pb2.SNAPSHOT_MODE_NONE, 0)
    assert fn.state == types_pb2.FUNCTION_STATE_READY
    text, source, _ = _chat(cluster, "plain")
    assert source == "normal_start"
    assert text, "the demo model produced no text"
    _admin(cluster).DeleteFunction(scheduler_pb2.DeleteFunctionRequest(function_id=fn.id), timeout=10)
    return text


# --- tests --------------------------------------------------------------------------------

def test_cold_start_from_snapshot_gives_identical_greedy_text(cluster: Cluster, reference: str) -> None:
    standby = _wait_standby(cluster)
    _stop_serving(cluster)
    text, source, instance = _chat(cluster, "demo")
    assert (source, instance) == ("cold_start", standby.id)
    assert text == reference


def test_process_mode_standby_is_restored_by_the_driver_alone(cluster: Cluster, demo_model_dir: Path,
                                                               reference: str) -> None:
    fid = "default/default/proc"
    fn = _create(cluster, "proc", demo_model_dir, types_pb2.SNAPSHOT_MODE_PROCESS, 1)
    assert fn.state == types_pb2.FUNCTION_STATE_READY, "process mode builds no snapshot"
    try:
        standby = _wait_standby(cluster, fid)
        assert _snapshot(cluster, fid) is None
        logs = _admin(cluster).GetInstanceLogs(scheduler_pb2.GetInstanceLogsRequest(instance_id=standby.id), timeout=10).logs
        assert "load:" in logs and "standby: attach" not in logs, logs[-2000:]
        text, source, instance = _chat(cluster, "proc")
        assert (source, instance) == ("cold_start", standby.id)
        assert text == reference
        # Suspend is the checkpoint again (no release): the same process goes back to STANDBY
        # and the next request restores it once more.
        suspended = _agent(cluster).SuspendInstance(nodeagent_pb2.SuspendInstanceRequest(instance_id=standby.id),
                                                    timeout=30).instance
        assert suspended.state == InstanceState.INSTANCE_STATE_STANDBY
        wait_for(lambda: any(i.id == standby.id and i.state == InstanceState.INSTANCE_STATE_STANDBY
                             for i in _instances(cluster, fid)), 10, "the suspended instance in etcd")
        again = _chat(cluster, "proc")
        assert again == (reference, "cold_start", standby.id)
    finally:
        _admin(cluster).DeleteFunction(scheduler_pb2.DeleteFunctionRequest(function_id=fid), timeout=10)


def test_standby_that_died_gets_a_clear_503_and_is_cleaned_up(cluster: Cluster) -> None:
    _stop_serving(cluster)
    standby = _wait_standby(cluster)
    killed = _runc(cluster, "kill", f"sw-{standby.id}", "KILL")
    assert killed.returncode == 0, killed.stderr
    began = time.monotonic()
    try:
        text, source, _ = _chat(cluster, "demo")
    except openai.APIStatusError as err:
        # The usual case: the request picks the standby before the scheduler hears of its death.
        assert err.status_code == 503, err
        # Either the restore met the dead process, or waited while the reconcile pass marked it
        # FAILED; both name the standby and why.
        body = str(err.body)
        assert standby.id in body and "restore" in body, body
        assert "control attach" in body or "container exited unexpectedly" in body, body
    else:
        # The reconcile pass saw the death first: the standby is FAILED, never picked, and the
        # request is served by a normal start instead.
        assert source == "normal_start" and text
    assert time.monotonic() - began < 60
    wait_for(lambda: f"sw-{standby.id}" not in _containers(cluster), 15, "the dead container removed")
    gone_or_failed = {i.id: i.state for i in _instances(cluster, DEMO)}.get(standby.id, InstanceState.INSTANCE_STATE_FAILED)
    assert gone_or_failed == InstanceState.INSTANCE_STATE_FAILED


def test_corrupt_chunk_is_never_served_and_the_snapshot_is_rebuilt(cluster: Cluster, reference: str) -> None:
    _stop_serving(cluster)
    standby = _wait_standby(cluster)
    before = _snapshot(cluster)
    assert before is not None and before.state == types_pb2.SNAPSHOT_STATE_READY
    since = asyncio.run(_mod_revision(cluster.etcd.address, keys.snapshot_key(DEMO, 1)))
    # Flip bytes in chunk 0 on disk, then restart the blobstore so its cache no longer holds
    # the good copy: the next reader must go to disk.
    chunk = next((cluster.config.var_dir / "blobstore" / "d0" / "snapshots" / "default.default.demo.1").glob(
        "*/000000.chunk"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    chunk.write_bytes(bytes(data))
    cluster.stop_service("blobstore")
    cluster.start_service("blobstore")
    # Without its standby, the controller starts a new one, which must attach from disk.
    _agent(cluster).StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id=standby.id), timeout=30)
    wait_for(lambda: (s := _snapshot(cluster)) is not None and (s.state != types_pb2.SNAPSHOT_STATE_READY
                                                                 or s.attempts > before.attempts),
             60, "the snapshot marked corrupt", interval=0.1)
    # A request meanwhile is served by a normal start (or by the rebuilt snapshot), never from bad data.
    text, source, _ = _chat(cluster, "demo")
    assert text == reference and source in ("normal_start", "cold_start")
    wait_for(lambda: (s := _snapshot(cluster)) is not None and s.state == types_pb2.SNAPSHOT_STATE_READY
             and s.attempts == before.attempts + 1, 120, "the snapshot rebuilt", interval=0.25)

    snaps = asyncio.run(_history(cluster.etcd.address, keys.snapshot_key(DEMO, 1), types_pb2.Snapshot, since, 5))
    states = [(e.value.state, e.value.message) for e in snaps if e.value is not None]
    marked = [i for i, (st, _) in enumerate(states) if st == types_pb2.SNAPSHOT_STATE_CORRUPT]
    assert marked, states
    message = states[marked[0]][1]
    assert "chunk 0" in message and cluster.config.node_name in message, message
    after = [st for st, _ in states[marked[0]:]]
    assert types_pb2.SNAPSHOT_STATE_BUILDING in after and after[-1] == types_pb2.SNAPSHOT_STATE_READY, states
    insts = asyncio.run(_history(cluster.etcd.address, keys.INSTANCES, types_pb2.Instance, since, 5))
    failed = [e.value.message for e in insts if e.value is not None and e.value.state == InstanceState.INSTANCE_STATE_FAILED]
    assert any("is corrupt: chunk 0" in m for m in failed), failed
    with cluster.channel_as("blobstore", Identity("nodeagent", cluster.node_name("nodeagent"))) as ch:
        verified = blobstore_pb2_grpc.BlobstoreServiceStub(ch).VerifySnapshot(
            blobstore_pb2.VerifySnapshotRequest(snapshot_id=keys.snapshot_id(DEMO, 1)), timeout=30)
    assert verified.ok, verified.message

    # Standbys come back on the rebuilt snapshot and cold-start to the same text. (A serving
    # instance covers the node's standby need, so stop it first.)
    _stop_serving(cluster)
    standby = _wait_standby(cluster)
    assert _chat(cluster, "demo") == (reference, "cold_start", standby.id)


def test_idle_instance_parks_back_into_the_standby_and_cold_starts_again(cluster: Cluster, demo_model_dir: Path,
                                                                        reference: str) -> None:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="parky", image="builtin",
                                  model_dir=str(demo_model_dir))
    spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_ARENA
    spec.policy.standby_per_node = 1
    spec.policy.idle_timeout.FromSeconds(2)
    fid = _admin(cluster).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10).function.id
    wait_for(lambda: _admin(cluster).GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=10).function.state
             == types_pb2.FUNCTION_STATE_READY, 120, "parky READY", interval=0.25)
    standby = _wait_standby(cluster, fid)
    text, source, first = _chat(cluster, "parky")
    assert (text, source, first) == (reference, "cold_start", standby.id)
    # Idle past idle_timeout: the same container is suspended back to STANDBY (no new container).
    wait_for(lambda: [(i.id, i.state) for i in _instances(cluster, fid)] == [(first, InstanceState.INSTANCE_STATE_STANDBY)],
             60, "the idle instance parked as the only standby", interval=0.25)
    assert _chat(cluster, "parky") == (reference, "cold_start", first)
    _admin(cluster).DeleteFunction(scheduler_pb2.DeleteFunctionRequest(function_id=fid), timeout=10)


def test_cold_start_after_a_nodeagent_restart(cluster: Cluster, reference: str) -> None:
    _stop_serving(cluster)
    _wait_standby(cluster)
    before = _containers(cluster)
    assert before
    cluster.stop_service("nodeagent", signal.SIGKILL)
    cluster.start_service("nodeagent")
    # The new agent removes what the dead one left (containers and keys), then the controller
    # starts a new standby from the arena snapshot, which survived on disk.
    standby = _wait_standby(cluster)
    assert not any(i.state in SERVING for i in _instances(cluster, DEMO))
    assert _chat(cluster, "demo") == (reference, "cold_start", standby.id)
    live = _agent(cluster).ListInstances(nodeagent_pb2.NodeAgentServiceListInstancesRequest(), timeout=10).instances
    known = {f"sw-{i.id}" for i in live if i.state not in TERMINAL}
    # (a standby being started may not have its container yet, hence a subset)
    after = _containers(cluster)
    assert after <= known, "a container the restarted agent does not know survived"
    assert not before & after, "the dead agent's containers were not removed"
