"""The per-request flows on instances: start, restore, suspend, stop, logs.

A fenced node (``fencing``) refuses starts and restores with UNAVAILABLE naming the fence.
Each flow holds the instance's lock, writes every transition to etcd, and is bounded: a
start that does not reach its goal in time (or whose container dies) ends FAILED with the
reason and the tail of the container's output, its container removed, and raises StartFailed.
A PROCESS-mode standby the node's host memory cannot hold (``hostmem``) is refused with
RESOURCE_EXHAUSTED instead: before its container starts, or ENDED (not FAILED) at its checkpoint.
A start of a user image (any ``FunctionSpec.image`` but the builtin) is ``userimage``'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

from opentelemetry import trace

from services.nodeagent import (
    coldstandby,
    handover,
    hostmem,
    integrity,
    logs,
    probe,
    process_mode,
    spec_checks,
    userimage,
)
from services.nodeagent.agent import Live, NodeAgent
from services.nodeagent.bundle import IdMap, write_bundle
from services.nodeagent.container import (
    OTLP_SOCKET,
    bundle_spec,
    container_limits,
    free_port,
    make_work_dir,
    otlp_relay_target,
)
from services.nodeagent.forward import Forwarder, NetNs, TelemetryRelay
from services.nodeagent.machine import InstanceMachine, StartPlan, plan_start
from services.nodeagent.modelinfo import read_model_metadata
from services.nodeagent.tracing import in_span
from snapwake import errors, keys, telemetry
from snapwake.imageref import is_builtin
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState

__all__ = ["get_logs", "restore_instance", "start_instance", "stop_instance", "suspend_instance"]

log = logging.getLogger(__name__)
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{12}$")
_POLL = 0.25
_MAX_LOG_TAIL = 1 << 20  # GetInstanceLogs answers stay well under gRPC's message limit


def validate_target(req: nodeagent_pb2.StartInstanceRequest) -> StartPlan:
    """Checks what every StartInstanceRequest must hold (target, ids); raises InvalidArgument
    naming the bad field."""
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
    return plan


def validate_start(req: nodeagent_pb2.StartInstanceRequest) -> StartPlan:
    """Checks a StartInstanceRequest of the built-in image; raises InvalidArgument naming the bad
    field."""
    plan = validate_target(req)
    if plan is StartPlan.SNAPSHOT and process_mode.is_process(req.spec):
        raise errors.InvalidArgument("target: a SNAPSHOT_MODE_PROCESS function has no snapshot to build",
                                     field="target")
    if not is_builtin(req.spec.image):
        raise errors.InvalidArgument(f"spec.image: {req.spec.image!r} is a user image, not the builtin",
                                     field="spec.image")
    if not req.spec.model_dir or not Path(req.spec.model_dir).is_dir():
        raise errors.InvalidArgument(f"spec.model_dir: {req.spec.model_dir!r} is not a directory on this node",
                                     field="spec.model_dir")
    return plan


def _get(agent: NodeAgent, instance_id: str) -> Live:
    live = agent.instances.get(instance_id)
    if live is None:
        raise errors.NotFound(f"instance {instance_id} is not on node {agent.config.name}")
    return live


async def _alive(agent: NodeAgent, live: Live) -> None:
    state = await agent.containers.state(live.container_id)
    if state is None or not state.alive:
        why = await agent.exit_reason(live)
        raise errors.StartFailed("the container exited before it was ready"
                                 + (f": {why}" if why.startswith("out of memory") else ""))


async def _open_relay(agent: NodeAgent, live: Live) -> None:
    """The instance's way to the node's trace collector, when the node has one (the model server
    is told to use it by ``container.otlp_env``)."""
    target = otlp_relay_target(dict(item.split("=", 1) for item in agent.config.container_env))
    if target is not None:
        live.relay = TelemetryRelay(live.dir / OTLP_SOCKET, *target, agent.config.forward_idle_timeout)
        await live.relay.start()


def _attach_network(agent: NodeAgent, live: Live) -> None:
    """Points the instance's forwarder into its container's network namespace."""
    assert live.forwarder is not None
    try:
        live.forwarder.attach(NetNs.of_pid(live.pid, own=agent.containers.isolates_network))
    except OSError as exc:
        raise errors.StartFailed(f"cannot reach the container's network namespace: {exc}") from exc


async def _wait_phase(agent: NodeAgent, live: Live, want: str) -> None:
    """Polls until the model server reports ``want`` (health for serving, control status otherwise)."""
    endpoint = live.machine.instance.endpoint
    while True:
        await _alive(agent, live)
        if want == "serving":
            phase = await probe.health_phase(agent.http, endpoint)
        else:
            try:
                phase = (await probe.control(live.control_socket, {"op": "status"}, 2.0)).get("phase")
            except errors.Unavailable:  # the model server has not opened its socket yet
                phase = None
        if phase == want:
            return
        await asyncio.sleep(_POLL)


async def _reach_goal(agent: NodeAgent, live: Live, plan: StartPlan, deadline: float, sample: str = "") -> None:
    if plan is StartPlan.STANDBY:
        if live.process_mode:  # loaded normally: warm it up, then the driver takes the whole process
            await _wait_phase(agent, live, "serving")
            await process_mode.warm_up(agent.http, live.machine.instance.endpoint, sample,
                                       max(1.0, deadline - time.monotonic()))
        else:
            await _wait_phase(agent, live, "released")
        if live.gpu:
            await agent.checkpoint(live, deadline - time.monotonic())
        await agent.move(live, InstanceState.INSTANCE_STATE_STANDBY)
        return
    await _wait_phase(agent, live, "serving")
    if plan is StartPlan.RUNNING:
        await agent.move(live, InstanceState.INSTANCE_STATE_RUNNING)
        return
    inst = live.machine.instance
    sid = keys.snapshot_id(inst.function_id, inst.revision)
    started = time.monotonic()
    reply = await probe.control(live.control_socket, {"op": "snapshot", "snapshot_id": sid},
                                max(1.0, deadline - time.monotonic()))
    await _record_snapshot(agent, inst, reply, time.monotonic() - started)
    await agent.destroy(live)
    await agent.move(live, InstanceState.INSTANCE_STATE_ENDED, f"snapshot {sid} stored")


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
        await agent.etcd.update(key, types_pb2.Snapshot, mutate)
    except errors.NotFound:  # built outside the scheduler (tools, tests): create the record
        await agent.etcd.create(key, mutate(types_pb2.Snapshot()))


@telemetry.traced("container.start")
async def start_instance(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest) -> types_pb2.Instance:
    """Starts a container and returns once it reached ``req.target`` (see module docstring)."""
    agent.check_serving()
    if not is_builtin(req.spec.image):
        return await userimage.start_user_image(agent, req, validate_target(req))
    plan = validate_start(req)
    model_dir = spec_checks.resolve_model_dir(req.spec.model_dir, agent.config.model_roots, agent.private_paths())
    spec_checks.check_env(req.spec.env)
    # Read first: nothing may await between the checks below and the instance's registration.
    model = await asyncio.to_thread(read_model_metadata, Path(model_dir))
    if model is not None and req.spec.chat_template:
        model.has_chat_template = True
    if req.instance_id in agent.instances:
        raise errors.AlreadyExists(f"instance {req.instance_id} already exists on {agent.config.name}")
    timeout = userimage.start_timeout(agent, req)
    use_gpu = bool(agent.gpus) and req.spec.resources.gpu_count > 0
    gpu_bytes = req.gpu_memory_bytes or req.spec.resources.gpu_memory_bytes
    if plan is StartPlan.STANDBY and use_gpu and process_mode.is_process(req.spec):
        agent.standby_room(req.instance_id, gpu_bytes)  # its RSS is added at the checkpoint
    # Inside its own network namespace any port would do; a distinct one keeps FakeContainers
    # (which share the host's) working the same way.
    port = free_port({live.port for live in agent.instances.values()})
    try:
        forwarder = Forwarder(agent.config.instance_host, port, agent.config.forward_idle_timeout)
    except OSError as exc:
        raise errors.Unavailable(f"cannot listen for the instance on {agent.config.instance_host}: {exc}") from exc
    inst = types_pb2.Instance(
        id=req.instance_id, function_id=req.function_id, revision=req.revision, node=agent.config.name,
        gpu_index=req.gpu_index, gpu_memory_bytes=gpu_bytes, endpoint=forwarder.endpoint)
    if model is not None:  # the scheduler copies it onto the function for the gateways
        inst.model.CopyFrom(model)
    idir = agent.config.instances_dir / req.instance_id
    live = Live(InstanceMachine(inst, agent.clock()), agent.containers.prefix + req.instance_id, idir, port, use_gpu,
                process_mode=process_mode.is_process(req.spec), forwarder=forwarder,
                memory_limit=container_limits(agent.config, req.spec, use_gpu).memory_bytes)
    agent.instances[req.instance_id] = live
    async with live.lock:
        deadline = time.monotonic() + timeout
        try:
            await agent.publish(live)
            await forwarder.start()
            idir.mkdir(parents=True, exist_ok=True)
            make_work_dir(idir, IdMap(agent.config.userns_base, agent.config.userns_size))
            await handover.open_socket(agent.blob_channel, live)
            await _open_relay(agent, live)
            gpu = agent.node_gpus.access(req.gpu_index) if use_gpu else None
            bundle = write_bundle(idir / "bundle", bundle_spec(agent.config, req, plan, port, idir, gpu),
                                  agent.rootfs_path(req.instance_id))
            await agent.move(live, plan.first)
            if plan is StartPlan.STANDBY and not live.process_mode:  # a corrupt snapshot fails here, marked
                await integrity.prewarm(agent.blob_channel, agent.etcd, agent.config.name, inst,
                                        max(1.0, deadline - time.monotonic()))
            live.pid = await agent.containers.run(live.container_id, bundle, live.log_path)
            _attach_network(agent, live)
            await asyncio.wait_for(_reach_goal(agent, live, plan, deadline, req.spec.sample_request),
                                   deadline - time.monotonic())
            return live.machine.instance
        except TimeoutError:
            reason = f"{req.instance_id} did not become {plan.name.lower()} within {timeout:.0f}s"
        except hostmem.HostMemoryFull as exc:  # no room for the standby after all: ended, not failed
            await agent.end(live, exc.message)
            raise
        except errors.SnapwakeError as exc:
            reason = f"{req.instance_id}: {exc.message}"
        except asyncio.CancelledError:  # the caller gave up: leave no half-started container
            await asyncio.shield(agent.fail(live, "start cancelled by the caller"))
            raise
        output = logs.tail(live.log_path, 1500).strip()
        reason += f"; container output:\n{output}" if output else "; the container wrote no output"
        await integrity.note_failure(agent.etcd, agent.config.name, inst, reason)
        await agent.fail(live, reason)
        raise errors.StartFailed(reason)


@telemetry.traced("restore")
async def restore_instance(agent: NodeAgent, req: nodeagent_pb2.RestoreInstanceRequest,
                           limit_s: float = 60.0) -> nodeagent_pb2.RestoreInstanceResponse:
    """STANDBY -> RESTORING -> RUNNING: blobstore prepare and driver restore at once, then attach
    (process mode: the driver restore alone, see ``process_mode``)."""
    agent.check_serving()
    live = _get(agent, req.instance_id)
    async with live.lock:
        inst = live.machine.instance
        if inst.state != InstanceState.INSTANCE_STATE_STANDBY:
            why = f" ({inst.message.splitlines()[0]})" if inst.message else ""  # a dead standby says so
            raise errors.FailedPrecondition(f"instance {inst.id} is {InstanceState.Name(inst.state)}{why}, not STANDBY")
        if live.gpu and req.gpu_index != inst.gpu_index:
            raise errors.InvalidArgument(f"gpu_index: the standby was checkpointed on GPU {inst.gpu_index}",
                                         field="gpu_index")
        started = time.perf_counter()
        # Waiting for a slot leaves the standby as it is: a wait that runs out fails nothing.
        async with agent.gate.restore(limit_s) as waited:
            trace.get_current_span().set_attribute("snapwake.driver_gate.wait_seconds", waited)
            # A cold standby needs no step of its own: its pages fault back in (``coldstandby``).
            tier = coldstandby.COLD if live.cold else coldstandby.HOT
            trace.get_current_span().set_attribute("snapwake.standby.tier", tier)
            await agent.move(live, InstanceState.INSTANCE_STATE_RESTORING)
            restore = _restore_process if live.process_mode or live.user_image else _restore_arena
            resp = await restore(agent, live, started, max(0.1, limit_s - waited))
            agent.cold_metrics.restore.labels(tier).observe(inst.last_start_seconds)
            log.info("restored from the %s tier in %.3fs", tier, inst.last_start_seconds, extra={"instance_id": inst.id})
            return resp


async def _restore_arena(agent: NodeAgent, live: Live, started: float,
                         limit_s: float) -> nodeagent_pb2.RestoreInstanceResponse:
    """RESTORING -> RUNNING: blobstore prepare and driver restore at once, then attach (under the
    lock and a restore slot)."""
    inst = live.machine.instance
    sid, gpu = keys.snapshot_id(inst.function_id, inst.revision), inst.gpu_index if live.gpu else -1
    restore: Awaitable[float] = agent.checkpointer.restore_all(_checkpointed(live)) if live.gpu else _zero()
    try:
        _, restore_s, _ = await asyncio.wait_for(asyncio.gather(
            _prepare(agent, inst, sid, gpu, limit_s), in_span("driver_restore", restore),
            handover.open_socket(agent.blob_channel, live)), limit_s)
        async with telemetry.traced("attach"):
            attach = await probe.control(live.control_socket, {"op": "attach", "snapshot_id": sid, "gpu": gpu,
                                                               **telemetry.traceparent()}, limit_s)
    except (TimeoutError, errors.SnapwakeError) as exc:
        reason = f"restore of {inst.id} failed: {getattr(exc, 'message', None) or 'timed out'}"
        await integrity.note_failure(agent.etcd, agent.config.name, inst, reason)
        await agent.fail(live, reason + "; output:\n" + logs.tail(live.log_path, 1500))
        raise errors.StartFailed(reason) from exc
    total = time.perf_counter() - started
    inst.last_start_seconds = total
    await agent.move(live, InstanceState.INSTANCE_STATE_RUNNING)
    resp = nodeagent_pb2.RestoreInstanceResponse(instance=inst, dma_bytes=int(attach.get("bytes", 0)))
    resp.restore_duration.FromNanoseconds(int(restore_s * 1e9))
    resp.dma_duration.FromNanoseconds(int(float(attach.get("dma_seconds", 0.0)) * 1e9))
    resp.total_duration.FromNanoseconds(int(total * 1e9))
    return resp


def _checkpointed(live: Live) -> tuple[int, ...]:
    """The pids the standby's checkpoint took (its init when none was recorded)."""
    return live.cuda_pids if live.cuda_pids is not None else (live.pid,)


async def _zero() -> float:
    return 0.0


async def _restore_process(agent: NodeAgent, live: Live, started: float,
                           limit_s: float) -> nodeagent_pb2.RestoreInstanceResponse:
    """RESTORING -> RUNNING for a whole-process checkpoint: the driver restore alone (under the
    lock and a restore slot)."""
    inst = live.machine.instance
    try:
        restore_s = await asyncio.wait_for(process_mode.restore(
            agent.checkpointer, agent.http, _checkpointed(live), inst.endpoint, live.gpu, live.health_path), limit_s)
    except (TimeoutError, errors.SnapwakeError) as exc:
        reason = f"restore of {inst.id} failed: {getattr(exc, 'message', None) or 'timed out'}"
        await agent.fail(live, reason + "; output:\n" + logs.tail(live.log_path, 1500))
        raise errors.StartFailed(reason) from exc
    total = time.perf_counter() - started
    inst.last_start_seconds = total
    await agent.move(live, InstanceState.INSTANCE_STATE_RUNNING)
    resp = nodeagent_pb2.RestoreInstanceResponse(instance=inst)
    resp.restore_duration.FromNanoseconds(int(restore_s * 1e9))
    resp.total_duration.FromNanoseconds(int(total * 1e9))
    return resp


async def _prepare(agent: NodeAgent, inst: types_pb2.Instance, sid: str, gpu: int, limit_s: float) -> dict[str, Any]:
    """Asks the blobstore to start the DMA now, inside a span it continues (``traceparent``), with
    the snapshot record's manifest digest, so that only the recorded copy is loaded."""
    async with telemetry.traced("dma.prepare"):
        digest = ""
        try:
            entry = await agent.etcd.get(keys.snapshot_key(inst.function_id, inst.revision), types_pb2.Snapshot)
            digest = await integrity.attach_digest(
                agent.etcd, inst, cast(types_pb2.Snapshot, entry.value) if entry is not None else None)
        except errors.SnapwakeError as exc:  # the blobstore still checks the digest its pre-warm named
            log.warning("snapshot record of %s unreadable (%s); preparing without its digest", sid, exc.message,
                        extra={"instance_id": inst.id})
        return await probe.handover(agent.config.handover_socket, {
            "op": "prepare", "snapshot_id": sid, "gpu": gpu, **({"manifest_digest": digest} if digest else {}),
            **telemetry.traceparent()}, limit_s)


async def suspend_instance(agent: NodeAgent, instance_id: str, limit_s: float = 60.0) -> types_pb2.Instance:
    """IDLE -> STANDBY: the model server releases its weights and KV, then the driver checkpoints it
    (a whole process: its GPU state moves into its host memory, when the node has room, ``hostmem``)."""
    live = _get(agent, instance_id)
    async with live.lock:
        machine = live.machine
        if machine.state == InstanceState.INSTANCE_STATE_RUNNING and live.user_image:
            # No control socket to ask (the reconcile loop may not have seen its traffic go
            # quiet yet): the scheduler suspends only an instance it holds no claim on.
            await agent.move(live, InstanceState.INSTANCE_STATE_IDLE)
        elif machine.state == InstanceState.INSTANCE_STATE_RUNNING:  # the reconcile loop may not have seen it go idle
            status = await probe.control(live.control_socket, {"op": "status"}, 5.0)
            if int(status.get("inflight", 0)) == 0:
                await agent.move(live, InstanceState.INSTANCE_STATE_IDLE)
        if machine.state != InstanceState.INSTANCE_STATE_IDLE:
            raise errors.FailedPrecondition(f"instance {instance_id} is {InstanceState.Name(machine.state)}, not IDLE")
        try:
            if not live.whole_process:  # process mode: the checkpoint takes the weights too
                await probe.control(live.control_socket, {"op": "release"}, limit_s)
            if live.gpu:
                await agent.checkpoint(live, limit_s)
        except hostmem.HostMemoryFull:
            raise  # refused before the checkpoint: it stays IDLE, serving as it was
        except errors.SnapwakeError as exc:
            await agent.fail(live, f"suspend failed: {exc.message}")
            raise
        await agent.move(live, InstanceState.INSTANCE_STATE_STANDBY)
        return machine.instance


async def stop_instance(agent: NodeAgent, instance_id: str) -> None:
    """-> STOPPING -> ENDED; the container is removed now, the key after ``ended_linger``."""
    live = _get(agent, instance_id)
    async with live.lock:
        if live.machine.live:
            await agent.move(live, InstanceState.INSTANCE_STATE_STOPPING)
            await agent.destroy(live)
            await agent.move(live, InstanceState.INSTANCE_STATE_ENDED, "stopped")
        else:
            await agent.destroy(live)


def get_logs(agent: NodeAgent, instance_id: str, tail_bytes: int) -> str:
    """The tail of the container's output (``logs.tail``: no symlink followed), at most 1 MiB."""
    live = _get(agent, instance_id)
    return logs.tail(live.log_path, min(tail_bytes or 64 << 10, _MAX_LOG_TAIL))
