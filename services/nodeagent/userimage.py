"""Starting a user image: any OCI image that serves the OpenAI API over HTTP.

One start, bounded as a whole by the start timeout (the pull included)::

    CREATING       the instance's listener on the node (``agent.sandbox.listen``: its endpoint),
                   then the pull through the node's image cache (``agent.images``): by the
                   revision's pinned digest, or resolving it on the deploy validation; the
                   instance holds the digest until its container goes (``agent.destroy``)
    STARTING |     the command line from the image config and the spec's command/args, the
    SNAPSHOTTING   sandboxed bundle (``agent.sandbox``, ``sandbox.RuncSandbox`` on a node), the
                   container, the listener attached to its network namespace; then the readiness probe until it answers 200 (``health_path``, else
                   /health, falling back to /v1/models where /health is 404), then the warm-up
                   request (``sample_request``, ``model`` set to the served name) so the server
                   has loaded its model
    then           RUNNING: serve. STANDBY (process mode): the driver checkpoints the process on
                   a GPU; on the CPU the warmed container waits as it is. SNAPSHOT, the deploy
                   validation: the same checkpoint on a GPU, then the container ends (ENDED) and
                   the answer carries the digest the scheduler pins the revision to.

A container that exits first fails the start with its exit status; a port that never answers
fails it on the start timeout, saying what the probe saw last. Either way the instance ends
FAILED with the reason and the tail of the container's output, its container removed, and
``StartFailed`` is raised. A reference or spec the node refuses, or a node without an image cache
or sandbox, raises ``InvalidArgument`` (or the cache's ``NotFound``): the scheduler does not retry
those. A standby the node's host memory cannot hold (``hostmem``) is refused with
``HostMemoryFull`` (RESOURCE_EXHAUSTED): before the pull, or at its checkpoint, where the instance
ends (ENDED, not FAILED) and its container is removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from services.nodeagent import hostmem, logs, process_mode, spec_checks
from services.nodeagent.agent import Live, NodeAgent
from services.nodeagent.container import container_limits
from services.nodeagent.machine import InstanceMachine, StartPlan
from services.nodeagent.usertypes import Image, ImageConfig, UserContainer
from snapwake import errors, imageref
from snapwake.openai.ids import model_id
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState

__all__ = ["command_line", "container_env", "start_timeout", "start_user_image"]

log = logging.getLogger(__name__)
_POLL = 0.25
_PROBE_LIMIT_S = 2.0
_FALLBACK_PATH = "/v1/models"


def start_timeout(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest) -> float:
    """The start's bound: the request's, else the spec's, else the node's default."""
    for duration in (req.timeout, req.spec.policy.start_timeout):
        if duration.seconds or duration.nanos:
            return duration.ToTimedelta().total_seconds()
    return agent.config.start_timeout


def command_line(config: ImageConfig, spec: types_pb2.FunctionSpec) -> tuple[str, ...]:
    """Entrypoint and Cmd as Kubernetes combines them: ``command`` replaces the Entrypoint and
    drops the Cmd, ``args`` replaces the Cmd. InvalidArgument when nothing is left to run."""
    entry = list(spec.command) or list(config.entrypoint)
    args = list(spec.args) if spec.args else [] if spec.command else list(config.cmd)
    if not entry + args:
        raise errors.InvalidArgument("spec.command: the image has neither Entrypoint nor Cmd, so the spec "
                                     "must give a command", field="spec.command")
    return tuple(entry + args)


def container_env(config: ImageConfig, spec: types_pb2.FunctionSpec) -> dict[str, str]:
    """The image's environment with the spec's on top (the image's own LD_*/PATH stay)."""
    spec_checks.check_env(spec.env)
    return {**_env_items(config.env), **dict(spec.env)}


def _env_items(env: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(env, Mapping):
        return dict(env)
    return {key: value for key, _, value in (item.partition("=") for item in env)}


def _check(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest) -> imageref.ImageRef:
    """Refuses what no retry could start (before anything is registered)."""
    ref = imageref.parse(req.spec.image)
    if agent.images is None or agent.sandbox is None:
        raise errors.InvalidArgument(f"spec.image: node {agent.config.name} runs no user images "
                                     "(no image cache or sandbox configured)", field="spec.image")
    spec_checks.check_env(req.spec.env)
    if req.spec.model_dir:
        spec_checks.resolve_model_dir(req.spec.model_dir, agent.config.model_roots, agent.private_paths())
    if req.instance_id in agent.instances:
        raise errors.AlreadyExists(f"instance {req.instance_id} already exists on {agent.config.name}")
    return ref


@dataclass
class _Progress:
    """Where the start is, for the message when its time runs out."""

    doing: str


async def start_user_image(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest,
                           plan: StartPlan) -> types_pb2.Instance:
    """Starts a user image toward ``plan`` (see the module docstring)."""
    ref = _check(agent, req)
    assert agent.sandbox is not None  # _check
    timeout = start_timeout(agent, req)
    use_gpu = bool(agent.gpus) and req.spec.resources.gpu_count > 0
    gpu_bytes = req.gpu_memory_bytes or req.spec.resources.gpu_memory_bytes
    if plan is StartPlan.STANDBY and use_gpu and process_mode.is_process(req.spec):
        agent.standby_room(req.instance_id, gpu_bytes)  # its RSS is added at the checkpoint
    inst = types_pb2.Instance(
        id=req.instance_id, function_id=req.function_id, revision=req.revision, node=agent.config.name,
        gpu_index=req.gpu_index, gpu_memory_bytes=gpu_bytes)
    idir = agent.config.instances_dir / req.instance_id
    live = Live(InstanceMachine(inst, agent.clock()), agent.containers.prefix + req.instance_id, idir,
                req.spec.http_port or 8000, use_gpu, process_mode=process_mode.is_process(req.spec), user_image=True,
                health_path=req.spec.health_path or "/health",
                memory_limit=container_limits(agent.config, req.spec, use_gpu).memory_bytes)
    agent.instances[req.instance_id] = live
    progress = _Progress(f"pulling {req.spec.image}")
    async with live.lock:
        try:
            inst.endpoint = await agent.sandbox.listen(req.instance_id, live.port)
            await agent.publish(live)
            idir.mkdir(parents=True, exist_ok=True)
            await asyncio.wait_for(_start(agent, live, req, ref, plan, progress, time.monotonic() + timeout),
                                   timeout)
            return live.machine.instance
        except TimeoutError:
            reason = f"{req.instance_id} did not become {plan.name.lower()} within {timeout:.0f}s: {progress.doing}"
            refused: type[errors.SnapwakeError] = errors.StartFailed
        except hostmem.HostMemoryFull as exc:  # no room for the standby after all: ended, not failed
            await agent.end(live, exc.message)
            raise
        except errors.SnapwakeError as exc:
            reason = f"{req.instance_id}: {exc.message}"
            refused = type(exc) if isinstance(exc, errors.InvalidArgument | errors.NotFound) else errors.StartFailed
        except asyncio.CancelledError:  # the caller gave up: leave no half-started container
            await asyncio.shield(agent.fail(live, "start cancelled by the caller"))
            raise
        output = logs.tail(live.log_path, 1500).strip()
        reason += f"; container output:\n{output}" if output else "; the container wrote no output"
        await agent.fail(live, reason)
        raise refused(reason)


async def _start(agent: NodeAgent, live: Live, req: nodeagent_pb2.StartInstanceRequest, ref: imageref.ImageRef,
                 plan: StartPlan, progress: _Progress, deadline: float) -> None:
    assert agent.images is not None and agent.sandbox is not None  # _check
    image = await _pull(agent, req, ref, deadline)
    live.image_held = image.digest  # released when its container goes (``agent.destroy``)
    inst = live.machine.instance
    inst.image_digest = image.digest
    container = UserContainer(
        instance_id=req.instance_id, request=req, image=image,
        args=command_line(image.config, req.spec), env=container_env(image.config, req.spec),
        cwd=image.config.working_dir or "/", user=image.config.user, container_port=live.port,
        endpoint=inst.endpoint, instance_dir=live.dir, gpu=live.gpu, gpu_index=req.gpu_index)
    bundle = agent.sandbox.bundle(container)
    await agent.move(live, plan.first)  # published with the digest
    progress.doing = f"starting the container of {image.digest}"
    live.pid = await agent.containers.run(live.container_id, bundle, live.log_path)
    try:
        await agent.sandbox.expose(container, live.pid)
    except errors.StartFailed:
        await _alive(agent, live)  # one that exited at once says so, with its exit status
        raise
    await _wait_ready(agent, live, req.spec.health_path, container.container_port, progress)
    progress.doing = "the warm-up request did not finish"
    served = req.spec.served_model_name or model_id(req.function_id)
    await process_mode.warm_up(agent.http, inst.endpoint, req.spec.sample_request,
                               max(1.0, deadline - time.monotonic()), model=served)
    await _reach_goal(agent, live, plan, deadline)


async def _pull(agent: NodeAgent, req: nodeagent_pb2.StartInstanceRequest, ref: imageref.ImageRef,
                deadline: float) -> Image:
    """The image, pinned to the revision's digest when it has one (a registry image is pulled by
    that digest, so a moved tag changes nothing; a local archive is compared with it)."""
    assert agent.images is not None
    pinned = req.image_digest
    text = str(ref.pinned(pinned)) if pinned and not ref.local else req.spec.image
    image = await agent.images.pull(text, secret=req.spec.registry_secret or None,
                                    timeout=max(1.0, deadline - time.monotonic()))
    if pinned and image.digest != pinned:
        raise errors.StartFailed(f"image {req.spec.image} is now {image.digest}, but revision {req.revision} is "
                                 f"pinned to {pinned}; deploy a new revision to run the new image")
    log.info("image %s is %s (%d bytes)", req.spec.image, image.digest, image.size_bytes,
             extra={"instance_id": req.instance_id})
    return image


async def _alive(agent: NodeAgent, live: Live) -> None:
    state = await agent.containers.state(live.container_id)
    if state is None or not state.alive:
        how = state.ended() if state is not None else "exit status unknown"
        why = await agent.exit_reason(live, how)
        raise errors.StartFailed(f"the container exited before it was ready ({how})"
                                 + (f": {why}" if why.startswith("out of memory") else ""))


async def _status(http: httpx.AsyncClient, endpoint: str, path: str) -> int | str:
    """The probe's answer: an HTTP status, or what went wrong instead."""
    try:
        return (await http.get(f"http://{endpoint}{path}", timeout=_PROBE_LIMIT_S)).status_code
    except httpx.ConnectError:
        return "nothing accepted a connection on the port"
    except httpx.TimeoutException:
        return f"no answer within {_PROBE_LIMIT_S:.0f}s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _wait_ready(agent: NodeAgent, live: Live, path: str, container_port: int, progress: _Progress) -> None:
    """Polls the readiness probe until it answers 200; an empty ``path`` is /health, then
    /v1/models once /health answers 404. Raises StartFailed when the container exits."""
    endpoint, path, auto = live.machine.instance.endpoint, path or "/health", not path
    while True:
        await _alive(agent, live)
        status = await _status(agent.http, endpoint, path)
        if status == 200:
            live.health_path = path
            return
        if status == 404 and auto and path != _FALLBACK_PATH:
            path = _FALLBACK_PATH
            continue
        seen = f"answered HTTP {status}" if isinstance(status, int) else status
        progress.doing = f"the readiness probe GET {path} on container port {container_port} never answered 200 " \
                         f"(last: {seen})"
        await asyncio.sleep(_POLL)


async def _reach_goal(agent: NodeAgent, live: Live, plan: StartPlan, deadline: float) -> None:
    if plan is StartPlan.RUNNING:
        await agent.move(live, InstanceState.INSTANCE_STATE_RUNNING)
        return
    if live.gpu and live.process_mode:  # a standby's, and the deploy validation proves it works
        # The validation's container ends right after: its GPU state is in host memory only briefly.
        await agent.checkpoint(live, max(1.0, deadline - time.monotonic()), standby=plan is StartPlan.STANDBY)
    if plan is StartPlan.STANDBY:
        await agent.move(live, InstanceState.INSTANCE_STATE_STANDBY)
        return
    await agent.destroy(live)
    live.pid = 0
    await agent.move(live, InstanceState.INSTANCE_STATE_ENDED, f"image {live.machine.instance.image_digest} validated")
