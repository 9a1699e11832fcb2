"""The nodeagent's flows without etcd, runc or a model: FakeEtcd, FakeContainers (plain
subprocesses), a recording no-GPU checkpointer and ``stub_modelserver.py`` as the container's
process (its side of the health and control contract, in milliseconds).

The agent is given one GPU record so the GPU steps (checkpoint, restore, reserved memory on the
node record, the GPU memory slice watch) run; the checkpointer only records them, and the
per-process GPU memory NVML would report is whatever a test sets on ``harness.gpu``. Not covered here, because they need a
blobstore: an arena STANDBY start (its snapshot is pre-warmed over gRPC first) and the cache
poll of the reconcile pass (it finds no blobstore and carries on). tests/inproc cover those.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.duration_pb2 import Duration

from services.nodeagent import operations
from services.nodeagent.agent import NodeAgent
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.containers import FakeContainers
from services.nodeagent.gpu import FakeProcessMemory
from snapwake import errors, keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.testing import free_port
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.unit.checkpointers import RecordingCheckpointer

pytestmark = pytest.mark.timeout(30)
STUB = Path(__file__).with_name("stub_modelserver.py")
FUNCTION_ID, GIB = "t/d/f", 1 << 30
SID = keys.snapshot_id(FUNCTION_ID, 1)
T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    state_dir: Path
    config: NodeAgentConfig
    etcd: FakeEtcd = field(default_factory=FakeEtcd)
    containers: FakeContainers = field(default_factory=FakeContainers)
    checkpointer: RecordingCheckpointer = field(default_factory=RecordingCheckpointer)
    clock: Clock = field(default_factory=Clock)
    gpu: FakeProcessMemory = field(default_factory=FakeProcessMemory)
    handover: list[dict[str, Any]] = field(default_factory=list)  # what the blobstore was asked
    agent: NodeAgent | None = None

    async def start(self) -> NodeAgent:
        self.agent = NodeAgent(self.config, self.etcd, self.containers, self.checkpointer,
                               [types_pb2.Gpu(index=0, memory_total_bytes=80 * GIB)], 64 * GIB, clock=self.clock,
                               gpu_memory=self.gpu)
        await self.agent.start()
        return self.agent

    async def instance(self, iid: str) -> types_pb2.Instance | None:
        entry = await self.etcd.get(keys.instance_key(self.config.name, iid), types_pb2.Instance)
        return None if entry is None else entry.value  # type: ignore[return-value]

    async def node(self) -> types_pb2.Node:
        entry = await self.etcd.get(keys.node_key(self.config.name), types_pb2.Node)
        assert entry is not None, "the node is not registered"
        return entry.value  # type: ignore[return-value]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    # A short state dir: Unix socket paths (instance control sockets) are limited to 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="swun-", dir="/tmp"))
    os.chmod(state, 0o711)  # the containers' root dirs are below it (rootfs_dir)
    python = state / "python"  # the container's "python -m modelserver" runs the stub
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUB}" "$@"\n')
    python.chmod(0o755)
    config = NodeAgentConfig(
        name="node-u", listen="127.0.0.1:7070", blobstore=f"127.0.0.1:{free_port()}", state_dir=str(state),
        handover_socket=str(state / "hs" / "handover.sock"), containers="fake", python=str(python),
        lease_ttl=2, gpus="none", start_timeout=10, reconcile_interval=3600, ended_linger=5,
        model_roots=(str(STUB.parent),), rootfs_dir=str(state / "rootfs"))
    h = Harness(state, config)

    async def handover(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h.handover.append(json.loads(await reader.readline()))
        writer.write(b'{"ok": true}\n')
        await writer.drain()
        writer.close()

    Path(config.handover_socket).parent.mkdir(parents=True)
    server = await asyncio.start_unix_server(handover, config.handover_socket)
    try:
        yield h
    finally:
        if h.agent is not None:
            await h.agent.stop()
        server.close()
        for leftover in await h.containers.list():
            await h.containers.delete(leftover.id)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def agent(harness: Harness) -> NodeAgent:
    return await harness.start()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def eventually(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], limit_s: float = 5.0) -> T:
    """Fetches until ``ok`` holds (every 20 ms, at most ``limit_s``); returns what it fetched."""
    for _ in range(int(limit_s / 0.02)):
        got = await fetch()
        if ok(got):
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true after {limit_s}s: {got}")


def start_request(iid: str, target: int = nodeagent_pb2.START_TARGET_RUNNING, timeout_s: int = 10,
                  mode: int = types_pb2.SNAPSHOT_MODE_ARENA, env: dict[str, str] | None = None,
                  gpu_bytes: int = 20 * GIB) -> nodeagent_pb2.StartInstanceRequest:
    spec = types_pb2.FunctionSpec(
        tenant="t", namespace="d", name="f", image="builtin", model_dir=str(STUB.parent), env=env or {},
        resources=types_pb2.Resources(gpu_count=1, gpu_memory_bytes=gpu_bytes),
        policy=types_pb2.Policy(snapshot_mode=mode),  # type: ignore[arg-type]
        sample_request=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    return nodeagent_pb2.StartInstanceRequest(instance_id=iid, function_id=FUNCTION_ID, revision=1, spec=spec,
                                              target=target, gpu_index=0,  # type: ignore[arg-type]
                                              timeout=Duration(seconds=timeout_s))


async def test_start_cleans_up_a_previous_run_and_registers_under_a_lease(harness: Harness) -> None:
    etcd, name = harness.etcd, harness.config.name
    orphan_bundle = harness.state_dir / "orphan"
    orphan_bundle.mkdir()
    (orphan_bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "30"], "cwd": "/"}}))
    orphan_pid = await harness.containers.run("sw-i-00000000dead", orphan_bundle, harness.state_dir / "orphan.log")
    (harness.config.instances_dir / "i-00000000dead").mkdir(parents=True)
    old_lease = await etcd.grant_lease(30)  # the crashed run's lease, still running
    await etcd.put(keys.node_key(name), types_pb2.Node(name=name), lease=old_lease)
    await etcd.put(keys.instance_key(name, "i-00000000dead"), types_pb2.Instance(id="i-00000000dead", node=name))
    await etcd.put(keys.instance_key("other", "i-00000000beef"), types_pb2.Instance(id="i-00000000beef", node="other"))

    agent = await harness.start()

    assert await harness.containers.list() == [] and _gone(orphan_pid)
    assert list(harness.config.instances_dir.iterdir()) == []
    assert [e.key for e in await etcd.list(keys.INSTANCES, types_pb2.Instance)] == [
        keys.instance_key("other", "i-00000000beef")]  # another node's key is not ours to remove
    assert await etcd.refresh_lease(old_lease) == 0
    entry = await etcd.get(keys.node_key(name), types_pb2.Node)
    assert entry is not None and entry.lease == agent.lease.lease_id != old_lease
    node = entry.value
    assert node.address == "127.0.0.1:7070" and node.host_memory_bytes == 64 * GIB  # type: ignore[attr-defined]
    assert [g.memory_total_bytes for g in node.gpus] == [80 * GIB]  # type: ignore[attr-defined]


async def test_start_running_then_stop_and_forget(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000a001"
    inst = await operations.start_instance(agent, start_request(iid))
    assert inst.state == InstanceState.INSTANCE_STATE_RUNNING and inst.endpoint.startswith("127.0.0.1:")
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_RUNNING and stored.node == "node-u"
    entry = await harness.etcd.get(keys.instance_key(harness.config.name, iid), types_pb2.Instance)
    assert entry is not None and entry.lease == agent.lease.lease_id  # dies with the node
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 20 * GIB
    with pytest.raises(errors.AlreadyExists):
        await operations.start_instance(agent, start_request(iid))

    await operations.stop_instance(agent, iid)
    stored = await harness.instance(iid)
    assert stored is not None and (stored.state, stored.message) == (InstanceState.INSTANCE_STATE_ENDED, "stopped")
    assert await harness.containers.state("sw-" + iid) is None
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 0
    harness.clock.now += harness.config.ended_linger
    await agent.reconcile_once()  # the ENDED key has lingered long enough
    assert await harness.instance(iid) is None and iid not in agent.instances


async def test_reconcile_reports_idle_and_a_dead_container(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000a002"
    await operations.start_instance(agent, start_request(iid))
    await agent.reconcile_once()
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_IDLE  # status: inflight 0
    assert stored.host_rss_bytes > 0
    os.kill(agent.instances[iid].pid, signal.SIGKILL)
    await eventually(lambda: harness.containers.state("sw-" + iid), lambda s: s is not None and not s.alive)
    await agent.reconcile_once()
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert "exited unexpectedly" in stored.message and "stub model server serving" in stored.message
    assert await harness.containers.state("sw-" + iid) is None


@pytest.mark.parametrize(("env", "timeout_s", "needle"), [
    ({"STUB_BEHAVIOUR": "exit"}, 10, "no config.json"),  # the container's own words
    ({"STUB_BEHAVIOUR": "hang"}, 1, "did not become running within 1s"),
])
async def test_a_failed_start_is_marked_failed_with_its_reason(
        harness: Harness, agent: NodeAgent, env: dict[str, str], timeout_s: int, needle: str) -> None:
    iid = "i-00000000b001"
    with pytest.raises(errors.StartFailed, match=needle):
        await operations.start_instance(agent, start_request(iid, timeout_s=timeout_s, env=env))
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED and needle in stored.message
    assert await harness.containers.list() == []


async def test_suspend_then_restore(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000c001"
    await operations.start_instance(agent, start_request(iid))
    pid = agent.instances[iid].pid
    parked = await operations.suspend_instance(agent, iid)
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY
    assert harness.checkpointer.calls == [("checkpoint", pid)]
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 0  # a standby holds no GPU memory
    with pytest.raises(errors.InvalidArgument, match="gpu_index"):
        await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid, gpu_index=1))

    resp = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING and resp.dma_bytes == 1234
    assert harness.checkpointer.calls[-1] == ("restore", pid)
    assert [(m["op"], m["snapshot_id"], m["gpu"]) for m in harness.handover] == [("prepare", SID, 0)]
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_RUNNING
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 20 * GIB
    with pytest.raises(errors.FailedPrecondition, match="RUNNING, not STANDBY"):
        await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))


async def test_suspend_refuses_a_busy_instance(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000c002"
    await operations.start_instance(agent, start_request(iid, env={"STUB_INFLIGHT": "1"}))
    with pytest.raises(errors.FailedPrecondition, match="RUNNING, not IDLE"):
        await operations.suspend_instance(agent, iid)
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_RUNNING and harness.checkpointer.calls == []


async def test_a_corrupt_snapshot_met_on_restore_marks_its_record(harness: Harness, agent: NodeAgent) -> None:
    iid, key = "i-00000000c003", keys.snapshot_key(FUNCTION_ID, 1)
    await harness.etcd.put(key, types_pb2.Snapshot(id=SID, state=types_pb2.SNAPSHOT_STATE_READY,
                                                   disk_nodes=["node-u", "node-v"]))
    corrupt = f"snapshot {SID} is corrupt: chunk 3: checksum mismatch"
    await operations.start_instance(agent, start_request(iid, env={"STUB_FAIL_ATTACH": corrupt}))
    await operations.suspend_instance(agent, iid)
    with pytest.raises(errors.StartFailed, match="chunk 3"):
        await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    entry = await harness.etcd.get(key, types_pb2.Snapshot)
    assert entry is not None
    snap: types_pb2.Snapshot = entry.value  # type: ignore[assignment]
    assert snap.state == types_pb2.SNAPSHOT_STATE_CORRUPT and list(snap.disk_nodes) == ["node-v"]
    assert snap.message.startswith("node node-u: ") and "chunk 3" in snap.message
    assert await harness.containers.list() == []


async def test_a_snapshot_build_records_the_snapshot_and_ends(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000d001"
    inst = await operations.start_instance(agent, start_request(iid, target=nodeagent_pb2.START_TARGET_SNAPSHOT))
    assert (inst.state, inst.message) == (InstanceState.INSTANCE_STATE_ENDED, f"snapshot {SID} stored")
    entry = await harness.etcd.get(keys.snapshot_key(FUNCTION_ID, 1), types_pb2.Snapshot)
    assert entry is not None
    snap: types_pb2.Snapshot = entry.value  # type: ignore[assignment]
    assert (snap.state, snap.bytes_written, snap.manifest_digest) == (
        types_pb2.SNAPSHOT_STATE_READY, 4096, "sha256:stub")
    assert list(snap.disk_nodes) == ["node-u"] and await harness.containers.list() == []


async def test_a_process_mode_standby_is_warmed_checkpointed_and_restored(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000e001"
    req = start_request(iid, target=nodeagent_pb2.START_TARGET_STANDBY, mode=types_pb2.SNAPSHOT_MODE_PROCESS)
    inst = await operations.start_instance(agent, req)
    pid = agent.instances[iid].pid
    assert inst.state == InstanceState.INSTANCE_STATE_STANDBY and harness.checkpointer.calls == [("checkpoint", pid)]
    resp = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING
    assert harness.checkpointer.calls[-1] == ("restore", pid) and harness.handover == []  # no DMA


# --- host memory for whole-process standbys (``hostmem``): the node has 64 GiB, 51.2 GiB allowed ---
PROCESS = types_pb2.SNAPSHOT_MODE_PROCESS


async def test_a_process_mode_park_that_host_memory_cannot_hold_is_refused_and_stays_idle(
        harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000e101"
    await operations.start_instance(agent, start_request(iid, mode=PROCESS, gpu_bytes=60 * GIB))
    assert agent.instances[iid].memory_limit == 16 * GIB + 60 * GIB  # room for its parked GPU state
    with pytest.raises(errors.ResourceExhausted, match=rf"host memory: a standby of {iid} needs ~60\.\d GiB, "
                                                       r"0\.\d GiB of 51\.2 GiB committed"):
        await operations.suspend_instance(agent, iid)
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_IDLE  # untouched, still serving
    assert harness.checkpointer.calls == [] and agent.instances[iid].standby_host_bytes == 0
    assert (await harness.containers.state("sw-" + iid)).alive  # type: ignore[union-attr]
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 60 * GIB  # it keeps its slice


async def test_process_mode_parks_are_admitted_while_host_memory_allows(harness: Harness, agent: NodeAgent) -> None:
    first, second, third = "i-00000000e201", "i-00000000e202", "i-00000000e203"
    for iid in (first, second, third):
        await operations.start_instance(agent, start_request(iid, mode=PROCESS))
    await operations.suspend_instance(agent, first)
    await operations.suspend_instance(agent, second)  # ~20 GiB each: 40 of 51.2 GiB
    held = agent.instances[first].standby_host_bytes
    assert 20 * GIB < held < 21 * GIB  # its slice plus its RSS, held while it is a standby
    with pytest.raises(errors.ResourceExhausted, match=r"needs ~20\.\d GiB, 40\.\d GiB of 51\.2 GiB"):
        await operations.suspend_instance(agent, third)
    assert (await harness.instance(third)).state == InstanceState.INSTANCE_STATE_IDLE  # type: ignore[union-attr]
    # A restored standby's GPU state is back on the GPU: its room is free again.
    await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=first))
    assert agent.instances[first].standby_host_bytes == 0
    parked = await operations.suspend_instance(agent, third)
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY
    assert [op for op, _ in harness.checkpointer.calls] == ["checkpoint", "checkpoint", "restore", "checkpoint"]


async def test_an_arena_park_is_not_held_to_the_host_memory_rule(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000e301"  # its weights wait in the blobstore: the checkpoint moves a bare context
    await operations.start_instance(agent, start_request(iid, gpu_bytes=60 * GIB))
    assert agent.instances[iid].memory_limit == 16 * GIB  # no GPU state parked in its memory
    parked = await operations.suspend_instance(agent, iid)
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY and agent.instances[iid].standby_host_bytes == 0


async def test_a_process_mode_standby_start_without_host_memory_is_refused_before_it_runs(
        harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000e401"
    req = start_request(iid, target=nodeagent_pb2.START_TARGET_STANDBY, mode=PROCESS, gpu_bytes=52 * GIB)
    with pytest.raises(errors.ResourceExhausted, match=f"a standby of {iid} needs ~52.0 GiB"):
        await operations.start_instance(agent, req)
    assert iid not in agent.instances and await harness.instance(iid) is None  # no key: nothing failed
    assert await harness.containers.list() == [] and harness.checkpointer.calls == []


async def test_a_standby_whose_rss_tips_host_memory_over_ends_without_failing(
        harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000e501"  # its slice alone fits (checked before the start), its slice and RSS do not
    req = start_request(iid, target=nodeagent_pb2.START_TARGET_STANDBY, mode=PROCESS,
                        gpu_bytes=int(64 * GIB * 0.8) - (1 << 20))
    with pytest.raises(errors.ResourceExhausted, match=f"host memory: a standby of {iid}"):
        await operations.start_instance(agent, req)
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_ENDED  # not a crash to count
    assert stored.message.startswith(f"host memory: a standby of {iid}")
    assert await harness.containers.list() == [] and harness.checkpointer.calls == []


@pytest.mark.parametrize("flow", ["stop", "suspend", "restore", "logs"])
async def test_an_unknown_instance_is_not_found(agent: NodeAgent, flow: str) -> None:
    iid = "i-ffffffffffff"
    calls = {"stop": lambda: operations.stop_instance(agent, iid),
             "suspend": lambda: operations.suspend_instance(agent, iid),
             "restore": lambda: operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))}
    with pytest.raises(errors.NotFound, match=iid):
        if flow == "logs":
            operations.get_logs(agent, iid, 100)
        else:
            await calls[flow]()


async def test_the_node_re_registers_when_its_lease_is_lost(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-00000000f001"
    await operations.start_instance(agent, start_request(iid))
    lost = agent.lease.lease_id
    harness.etcd.advance(60)  # the lease ran out (a partition, an etcd restart): its keys go
    assert await harness.instance(iid) is None
    # The keeper's next refresh (every 0.67 s) finds the lease gone: the node fences itself
    # (its serving instance is stopped: etcd and the scheduler count it gone), then rejoins.
    entry = await eventually(lambda: harness.etcd.get(keys.node_key("node-u"), types_pb2.Node),
                             lambda e: e is not None)
    assert entry is not None and entry.lease == agent.lease.lease_id != lost
    assert agent.fenced() == ""
    assert agent.instances[iid].machine.state == InstanceState.INSTANCE_STATE_ENDED
    assert await harness.containers.list() == []
    assert await harness.instance(iid) is None  # not offered again: etcd no longer had it


async def test_a_node_cut_off_from_etcd_fences_itself_then_reconciles_before_serving(harness: Harness) -> None:
    """etcd unreachable: within the lease TTL by the node's own clock it refuses new work, lets
    requests in flight finish (bounded), stops its serving instances and keeps its standby
    parked; when etcd answers again it drops what etcd no longer wants, offers the standby
    again under a new lease and serves."""
    harness.config = dataclasses.replace(harness.config, fence_drain_s=0.4)
    agent = await harness.start()
    idle, busy, parked = "i-00000000f101", "i-00000000f102", "i-00000000f103"
    await operations.start_instance(agent, start_request(idle))
    await operations.start_instance(agent, start_request(busy, env={"STUB_INFLIGHT": "1"}))
    await operations.start_instance(agent, start_request(parked))
    await operations.suspend_instance(agent, parked)
    fn = types_pb2.Function(id=FUNCTION_ID, revision=1, state=types_pb2.FUNCTION_STATE_READY)
    await harness.etcd.put(keys.function_key(FUNCTION_ID), fn)
    old_lease = agent.lease.lease_id

    harness.etcd.down = True
    cut = time.monotonic()
    await eventually(lambda: _value(agent.fenced()), bool, limit_s=4)
    assert time.monotonic() - cut <= harness.config.lease_ttl  # its own clock, not etcd's word
    with pytest.raises(errors.Unavailable, match="fenced"):
        await operations.start_instance(agent, start_request("i-00000000f104"))
    with pytest.raises(errors.Unavailable, match="fenced"):
        await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=parked))
    ended = InstanceState.INSTANCE_STATE_ENDED
    await eventually(lambda: _value([agent.instances[i].machine.state for i in (idle, busy)]),
                     lambda states: states == [ended, ended])
    assert "1 requests still in flight after 0.4s" in agent.instances[busy].machine.instance.message
    assert agent.instances[parked].machine.state == InstanceState.INSTANCE_STATE_STANDBY
    assert [c.id for c in await harness.containers.list()] == [agent.instances[parked].container_id]
    assert agent.fenced()  # etcd is still down: no rejoin yet

    harness.etcd.down = False
    await eventually(lambda: _value(agent.fenced()), lambda why: why == "", limit_s=5)
    assert agent.lease.lease_id != old_lease and await harness.etcd.refresh_lease(old_lease) == 0
    node = await harness.node()
    assert node.name == "node-u"
    stored = await harness.instance(parked)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_STANDBY
    assert await harness.instance(idle) is None and await harness.instance(busy) is None
    entry = await harness.etcd.get(keys.instance_key(harness.config.name, parked), types_pb2.Instance)
    assert entry is not None and entry.lease == agent.lease.lease_id
    resp = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=parked))
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING


async def _value(value: T) -> T:
    return value


async def test_stop_removes_containers_and_revokes_the_lease(harness: Harness, agent: NodeAgent) -> None:
    await operations.start_instance(agent, start_request("i-00000000f002"))
    lease = agent.lease.lease_id
    harness.agent = None  # stopped here, not by the fixture
    await agent.stop()
    assert await harness.containers.list() == []
    assert await harness.etcd.get(keys.node_key("node-u"), types_pb2.Node) is None
    assert await harness.instance("i-00000000f002") is None
    assert await harness.etcd.refresh_lease(lease) == 0
    with contextlib.suppress(FileNotFoundError):
        assert list(harness.config.instances_dir.iterdir()) == []


async def test_a_builtin_instance_over_its_slice_and_allowance_is_failed(harness: Harness, agent: NodeAgent) -> None:
    iid = "i-0000000a9001"
    await operations.start_instance(agent, start_request(iid))  # a 20 GiB slice on GPU 0
    pid, allowance = agent.instances[iid].pid, harness.config.gpu_memory_builtin_allowance_bytes
    harness.gpu.usage = {pid: 20 * GIB + allowance}  # its CUDA context beyond the slice: healthy
    await agent.reconcile_once()
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_IDLE
    assert agent.instances[iid].gpu_memory_used == 20 * GIB + allowance

    harness.gpu.usage = {pid: 20 * GIB + allowance + (1 << 20)}
    await agent.reconcile_once()
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert stored.message == ("over its GPU memory slice: used 22529 MiB of 20480 MiB on GPU 0 (the built-in "
                              "model server may use 2048 MiB more for its CUDA context)")
    assert await harness.containers.state("sw-" + iid) is None and _gone(pid)
    assert (await harness.node()).gpus[0].memory_reserved_bytes == 0


async def test_only_serving_instances_are_watched_each_for_its_own_processes(
        harness: Harness, agent: NodeAgent) -> None:
    serving, parked = "i-0000000a9002", "i-0000000a9003"
    await operations.start_instance(agent, start_request(serving))
    await operations.start_instance(agent, start_request(parked))
    await operations.suspend_instance(agent, parked)
    pids = {iid: agent.instances[iid].pid for iid in (serving, parked)}
    # The standby's pid, and a pid in no container, hold far more than a slice.
    harness.gpu.usage = {pids[serving]: 19 * GIB, pids[parked]: 60 * GIB, os.getpid(): 70 * GIB}
    await agent.reconcile_once()
    assert agent.instances[serving].gpu_memory_used == 19 * GIB  # only its own process counted
    assert agent.instances[parked].gpu_memory_used == 0  # a standby is not checked
    states = [(await harness.instance(iid)).state for iid in (serving, parked)]  # type: ignore[union-attr]
    assert states == [InstanceState.INSTANCE_STATE_IDLE, InstanceState.INSTANCE_STATE_STANDBY]

    await operations.suspend_instance(agent, serving)
    reads = harness.gpu.reads
    await agent.reconcile_once()
    assert harness.gpu.reads == reads  # no instance to watch: NVML is not even read


@pytest.mark.parametrize(("nvml", "watch"), [(False, True), (True, False)])
async def test_without_nvml_or_with_the_watch_off_nothing_is_stopped(harness: Harness, nvml: bool, watch: bool) -> None:
    harness.config = dataclasses.replace(harness.config, gpu_memory_watch=watch)
    agent = await harness.start()
    iid = "i-0000000a9004"
    await operations.start_instance(agent, start_request(iid))
    harness.gpu.usage = {agent.instances[iid].pid: 80 * GIB} if nvml else None
    await agent.reconcile_once()
    stored = await harness.instance(iid)
    assert stored is not None and stored.state == InstanceState.INSTANCE_STATE_IDLE
    assert agent.instances[iid].gpu_memory_used == 0
    assert harness.gpu.reads == (0 if not watch else 1)
