"""The per-request flows on instances: start, restore, suspend, stop, logs.

Each flow holds the instance's lock, writes every transition to etcd, and is bounded: a
start that does not reach its goal in time (or whose container dies) ends FAILED with the
reason and the tail of the container's output, its container removed, and raises StartFailed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from services.nodeagent import probe
from services.nodeagent.agent import Live, NodeAgent
from services.nodeagent.bundle import write_bundle
from services.nodeagent.container import bundle_spec, free_port
from services.nodeagent.machine import InstanceMachine, StartPlan, plan_start
from snapwake import errors, keys
from snapwake.v1 import nodeagent_pb2, types_pb2

__all__ = ["get_logs", "restore_instance", "start_instance", "stop_instance", "suspend_instance"]

log = logging.getLogger(__name__)
S = types_pb2.InstanceState
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{12}$")
_POLL = 0.25


def validate_start(req: nodeagent_pb2.StartInstanceRequest) -> StartPlan:
    """Checks a StartInstanceRequest; raises InvalidArgument naming the bad field."""
    plan = plan_start(req.target)
    if plan is None:
        raise errors.InvalidArgument(f"target: expected RUNNING, STANDBY or SNAPSHOT, got {req.target}",
                                     field="target")
    if not _INSTANCE_ID.match(req.instance_id):
        raise errors.InvalidArgument(f"instance_id: expected i- and 12 hex chars, got {req.instance_id!r}",
                                     field="instance_id")
    try:
        keys.split_snapshot_id(keys.snapshot_id(req.function_id, req.revision))
    except ValueError as exc:
        raise errors.InvalidArgument(f"function_id: {exc}", field="function_id") from exc
    if req.spec.image not in ("", "builtin"):
        raise errors.InvalidArgument(f"spec.image: only the builtin runtime image is supported, "
                                     f"got {req.spec.image!r}", field="spec.image")
    if not req.spec.model_dir or not Path(req.spec.model_dir).is_dir():
        raise errors.InvalidArgument(f"spec.model_dir: {req.spec.model_dir!r} is not a directory on this node",
                                     field="spec.model_dir")
    return plan


def _start_timeout(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest) -> float:
    for duration in (req.timeout, req.spec.policy.start_timeout):
        if duration.seconds or duration.nanos:
            return duration.ToTimedelta().total_seconds()
    return agent.config.start_timeout


def _get(agent: NodeAgent, instance_id: str) -> Live:
    live = agent.instances.get(instance_id)
    if live is None:
        raise errors.NotFound(f"instance {instance_id} is not on node {agent.config.name}")
    return live


async def _alive(agent: NodeAgent, live: Live) -> None:
    state = await agent.runtime.state(live.container_id)
    if state is None or not state.alive:
        raise errors.StartFailed("the container exited before it was ready")


async def _wait_phase(agent: NodeAgent, live: Live, want: str) -> None:
    """Polls until the runtime reports ``want`` (health for serving, control status otherwise)."""
    endpoint = live.machine.instance.endpoint
    while True:
        await _alive(agent, live)
        if want == "serving":
            phase = await probe.health_phase(agent.http, endpoint)
        else:
            try:
                phase = (await probe.control(live.control_socket, {"op": "status"}, 2.0)).get("phase")
            except errors.Unavailable:  # the runtime has not opened its socket yet
                phase = None
        if phase == want:
            return
        await asyncio.sleep(_POLL)


async def _reach_goal(agent: NodeAgent, live: Live, plan: StartPlan, deadline: float) -> None:
    if plan is StartPlan.STANDBY:
        await _wait_phase(agent, live, "released")
        if live.gpu:
            await agent.checkpointer.checkpoint(live.pid)
        await agent.move(live, S.INSTANCE_STATE_STANDBY)
        return
    await _wait_phase(agent, live, "serving")
    if plan is StartPlan.RUNNING:
        await agent.move(live, S.INSTANCE_STATE_RUNNING)
        return
    inst = live.machine.instance
    sid = keys.snapshot_id(inst.function_id, inst.revision)
    started = time.monotonic()
    reply = await probe.control(live.control_socket, {"op": "snapshot", "snapshot_id": sid},
                                max(1.0, deadline - time.monotonic()))
    await _record_snapshot(agent, inst, reply, time.monotonic() - started)
    await agent.destroy(live)
    await agent.move(live, S.INSTANCE_STATE_ENDED, f"snapshot {sid} stored")


async def _record_snapshot(agent: NodeAgent, inst: types_pb2.Instance, reply: dict[str, Any],
                           seconds: float) -> None:
    """Marks the snapshot READY with its size and digest, and this node as holding it."""
    key = keys.snapshot_key(inst.function_id, inst.revision)

    def mutate(snap: types_pb2.Snapshot) -> types_pb2.Snapshot:
        snap.id = keys.snapshot_id(inst.function_id, inst.revision)
        snap.function_id, snap.revision = inst.function_id, inst.revision
        snap.state = types_pb2.SNAPSHOT_STATE_READY
        snap.bytes_written = snap.total_bytes = int(reply.get("bytes", 0))
        snap.manifest_digest = str(reply.get("manifest_digest", ""))
        if agent.config.name not in snap.disk_nodes:
            snap.disk_nodes.append(agent.config.name)
        snap.build_duration.FromNanoseconds(int(seconds * 1e9))
        return snap

    try:
        await agent.store.update(key, types_pb2.Snapshot, mutate)
    except errors.NotFound:  # built outside the scheduler (tools, tests): create the record
        await agent.store.create(key, mutate(types_pb2.Snapshot()))


async def start_instance(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest) -> types_pb2.Instance:
    """Starts a container and returns once it reached ``req.target`` (see module docstring)."""
    plan = validate_start(req)
    if req.instance_id in agent.instances:
        raise errors.AlreadyExists(f"instance {req.instance_id} already exists on {agent.config.name}")
    timeout = _start_timeout(agent, req)
    use_gpu = bool(agent.gpus) and req.spec.resources.gpu_count > 0
    port = free_port({live.port for live in agent.instances.values()})
    inst = types_pb2.Instance(
        id=req.instance_id, function_id=req.function_id, revision=req.revision, node=agent.config.name,
        gpu_index=req.gpu_index, gpu_memory_bytes=req.gpu_memory_bytes or req.spec.resources.gpu_memory_bytes,
        endpoint=f"127.0.0.1:{port}")
    idir = agent.config.instances_dir / req.instance_id
    live = Live(InstanceMachine(inst, agent.clock()), agent.runtime.prefix + req.instance_id, idir, port, use_gpu)
    agent.instances[req.instance_id] = live
    async with live.lock:
        deadline = time.monotonic() + timeout
        try:
            await agent.publish(live)
            idir.mkdir(parents=True, exist_ok=True)
            bundle = write_bundle(idir / "bundle", bundle_spec(agent.config, req, plan, port, idir, use_gpu))
            await agent.move(live, plan.first)
            live.pid = await agent.runtime.run(live.container_id, bundle, live.log_path)
            await asyncio.wait_for(_reach_goal(agent, live, plan, deadline), deadline - time.monotonic())
            return live.machine.instance
        except TimeoutError:
            reason = f"{req.instance_id} did not become {plan.name.lower()} within {timeout:.0f}s"
        except errors.SnapwakeError as exc:
            reason = f"{req.instance_id}: {exc.message}"
        except asyncio.CancelledError:  # the caller gave up: leave no half-started container
            await asyncio.shield(agent.fail(live, "start cancelled by the caller"))
            raise
        output = probe.tail(live.log_path, 1500).strip()
        reason += f"; container output:\n{output}" if output else "; the container wrote no output"
        await agent.fail(live, reason)
        raise errors.StartFailed(reason)


async def restore_instance(agent: NodeAgent, req: nodeagent_pb2.RestoreInstanceRequest,
                           limit_s: float = 60.0) -> nodeagent_pb2.RestoreInstanceResponse:
    """STANDBY -> RESTORING -> RUNNING: blobstore prepare and driver restore at once, then attach."""
    live = _get(agent, req.instance_id)
    async with live.lock:
        inst = live.machine.instance
        if inst.state != S.INSTANCE_STATE_STANDBY:
            raise errors.FailedPrecondition(f"instance {inst.id} is {S.Name(inst.state)}, not STANDBY")
        if live.gpu and req.gpu_index != inst.gpu_index:
            raise errors.InvalidArgument(f"gpu_index: the standby was checkpointed on GPU {inst.gpu_index}",
                                         field="gpu_index")
        started = time.perf_counter()
        await agent.move(live, S.INSTANCE_STATE_RESTORING)
        sid, gpu = keys.snapshot_id(inst.function_id, inst.revision), inst.gpu_index if live.gpu else -1
        restore: Awaitable[float] = agent.checkpointer.restore(live.pid) if live.gpu else _zero()
        try:
            _, restore_s = await asyncio.wait_for(asyncio.gather(
                probe.handover(agent.config.handover_socket, {"op": "prepare", "snapshot_id": sid, "gpu": gpu},
                               limit_s), restore), limit_s)
            attach = await probe.control(live.control_socket, {"op": "attach", "snapshot_id": sid, "gpu": gpu},
                                         limit_s)
        except (TimeoutError, errors.SnapwakeError) as exc:
            reason = f"restore of {inst.id} failed: {getattr(exc, 'message', None) or 'timed out'}"
            await agent.fail(live, reason + "; output:\n" + probe.tail(live.log_path, 1500))
            raise errors.StartFailed(reason) from exc
        total = time.perf_counter() - started
        inst.last_start_seconds = total
        await agent.move(live, S.INSTANCE_STATE_RUNNING)
    resp = nodeagent_pb2.RestoreInstanceResponse(instance=inst, dma_bytes=int(attach.get("bytes", 0)))
    resp.restore_duration.FromNanoseconds(int(restore_s * 1e9))
    resp.dma_duration.FromNanoseconds(int(float(attach.get("dma_seconds", 0.0)) * 1e9))
    resp.total_duration.FromNanoseconds(int(total * 1e9))
    return resp


async def _zero() -> float:
    return 0.0


async def suspend_instance(agent: NodeAgent, instance_id: str, limit_s: float = 60.0) -> types_pb2.Instance:
    """IDLE -> STANDBY: the runtime releases its weights and KV, then the driver checkpoints it."""
    live = _get(agent, instance_id)
    async with live.lock:
        machine = live.machine
        if machine.state == S.INSTANCE_STATE_RUNNING:  # the reconcile loop may not have seen it go idle
            status = await probe.control(live.control_socket, {"op": "status"}, 5.0)
            if int(status.get("inflight", 0)) == 0:
                await agent.move(live, S.INSTANCE_STATE_IDLE)
        if machine.state != S.INSTANCE_STATE_IDLE:
            raise errors.FailedPrecondition(f"instance {instance_id} is {S.Name(machine.state)}, not IDLE")
        try:
            await probe.control(live.control_socket, {"op": "release"}, limit_s)
            if live.gpu:
                await agent.checkpointer.checkpoint(live.pid)
        except errors.SnapwakeError as exc:
            await agent.fail(live, f"suspend failed: {exc.message}")
            raise
        await agent.move(live, S.INSTANCE_STATE_STANDBY)
        return machine.instance


async def stop_instance(agent: NodeAgent, instance_id: str) -> None:
    """-> STOPPING -> ENDED; the container is removed now, the key after ``ended_linger``."""
    live = _get(agent, instance_id)
    async with live.lock:
        if live.machine.live:
            await agent.move(live, S.INSTANCE_STATE_STOPPING)
            await agent.destroy(live)
            await agent.move(live, S.INSTANCE_STATE_ENDED, "stopped")
        else:
            await agent.destroy(live)


def get_logs(agent: NodeAgent, instance_id: str, tail_bytes: int) -> str:
    """The tail of the container's output.log."""
    live = _get(agent, instance_id)
    return probe.tail(live.log_path, tail_bytes or 64 << 10)
