"""Starting a user image on a node without runc or a registry: FakeEtcd, FakeContainers (plain
subprocesses), an in-memory image cache whose "image" runs ``stub_openai_image.py``, a sandbox
that only writes the command line and puts the node port in ``$PORT``, a recording
checkpointer, and the per-process GPU memory NVML would report set by each test (``node.gpu``).
Where the endpoint's traffic matters (RUNNING/IDLE) the sandbox is the real ``RuncSandbox``
listener and forwarder, attached to the host's namespace, with the same command-line bundle. The real image cache, sandbox and runc are in tests/integration/test_byo_image.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from google.protobuf.duration_pb2 import Duration

from services.nodeagent import operations, userimage
from services.nodeagent.agent import NodeAgent
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.containers import FakeContainers
from services.nodeagent.forward import Traffic
from services.nodeagent.gpu import FakeProcessMemory, NodeGpus
from services.nodeagent.sandbox import RuncSandbox
from services.nodeagent.usertypes import UserContainer
from snapwake import errors, keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.testing import free_port
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.unit.checkpointers import RecordingCheckpointer

pytestmark = pytest.mark.timeout(30)
STUB = Path(__file__).with_name("stub_openai_image.py")
SERVED, GIB = "acme/Echo-1B", 1 << 30
DIGEST = "sha256:" + "5e" * 32


@dataclass(frozen=True)
class StubConfig:
    entrypoint: Sequence[str] = (sys.executable, str(STUB))
    cmd: Sequence[str] = ("--served-model-name", SERVED)
    env: Sequence[str] = ("PATH=/usr/bin:/bin", "LD_LIBRARY_PATH=/usr/local/cuda/lib64")
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class StubImage:
    digest: str
    rootfs: Path
    config: StubConfig = StubConfig()
    size_bytes: int = 1234


@dataclass
class StubImages:
    """The image cache: every reference is the stub image at ``digest``; records the pulls."""

    digest: str = DIGEST
    pulls: list[tuple[str, str | None]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def pull(self, text: str, *, secret: str | None = None, timeout: float) -> StubImage:
        self.pulls.append((text, secret))
        return StubImage(self.digest, Path("/"))

    def release(self, digest: str) -> None:
        self.released.append(digest)


@dataclass
class HostSandbox:
    """No isolation (FakeContainers run on the host): the bundle is the command line, and the
    server is told to listen on the node port itself."""

    built: list[UserContainer] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def listen(self, instance_id: str, container_port: int) -> str:
        return f"127.0.0.1:{free_port()}"

    def bundle(self, container: UserContainer) -> Path:
        self.built.append(container)
        return _command_bundle(container, int(container.endpoint.rpartition(":")[2]))

    async def expose(self, container: UserContainer, pid: int) -> None:
        return None

    async def release(self, instance_id: str) -> None:
        self.released.append(instance_id)

    def traffic(self, instance_id: str) -> Traffic | None:
        return None  # no listener of its own: the node sees no traffic, and moves nothing


def _command_bundle(container: UserContainer, port: int) -> Path:
    """The bundle FakeContainers reads: the command line, with the server's port in ``$PORT``."""
    path = container.instance_dir / "bundle"
    path.mkdir(parents=True, exist_ok=True)
    env = [f"{k}={v}" for k, v in {**container.env, "PORT": str(port)}.items()]
    (path / "config.json").write_text(json.dumps({"process": {"args": list(container.args), "env": env,
                                                              "cwd": container.cwd}}))
    return path


class ForwardingSandbox(RuncSandbox):
    """The node's own listener and ``Forwarder`` (``RuncSandbox``), attached to the host's network
    namespace as FakeContainers share it; since the host has one port space, the server listens
    on a free port of its own (in ``$PORT``) instead of the container port, and the forwarder
    carries there."""

    def __init__(self, config: NodeAgentConfig) -> None:
        super().__init__(config, NodeGpus(), isolates_network=False)
        self.ports: dict[str, int] = {}

    async def listen(self, instance_id: str, container_port: int) -> str:
        self.ports[instance_id] = free_port()
        return await super().listen(instance_id, self.ports[instance_id])

    def bundle(self, container: UserContainer) -> Path:
        return _command_bundle(container, self.ports[container.instance_id])


@dataclass
class Node:
    agent: NodeAgent
    etcd: FakeEtcd
    containers: FakeContainers
    images: StubImages
    sandbox: HostSandbox | ForwardingSandbox
    checkpointer: RecordingCheckpointer
    gpu: FakeProcessMemory = field(default_factory=FakeProcessMemory)

    async def stored(self, iid: str) -> types_pb2.Instance:
        entry = await self.etcd.get(keys.instance_key(self.agent.config.name, iid), types_pb2.Instance)
        assert entry is not None
        return entry.value  # type: ignore[return-value]


@asynccontextmanager
async def _running_node(make_sandbox: Callable[[NodeAgentConfig], HostSandbox | ForwardingSandbox],
                        user_idle_quiet_s: float = 1.0) -> AsyncIterator[Node]:
    """A started agent; the reconcile loop never runs by itself (tests call ``reconcile_once``)."""
    state = Path(tempfile.mkdtemp(prefix="swui-", dir="/tmp"))
    config = NodeAgentConfig(name="node-u", blobstore=f"127.0.0.1:{free_port()}", state_dir=str(state),
                             handover_socket=str(state / "handover.sock"), containers="fake", lease_ttl=2,
                             gpus="none", start_timeout=10, reconcile_interval=3600, ended_linger=5,
                             user_idle_quiet_s=user_idle_quiet_s)
    n = Node(None, FakeEtcd(), FakeContainers(), StubImages(), make_sandbox(config), RecordingCheckpointer())  # type: ignore[arg-type]
    n.agent = NodeAgent(config, n.etcd, n.containers, n.checkpointer, [types_pb2.Gpu(index=0, memory_total_bytes=80 * GIB)],
                        64 * GIB, images=n.images, sandbox=n.sandbox, gpu_memory=n.gpu)
    await n.agent.start()
    try:
        yield n
    finally:
        await n.agent.stop()
        for leftover in await n.containers.list():
            await n.containers.delete(leftover.id)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with _running_node(lambda _: HostSandbox()) as n:
        yield n


QUIET_S = 1.0  # the default; every wait below is bounded by _reconcile_until


@pytest.fixture
async def forwarded_node() -> AsyncIterator[Node]:
    async with _running_node(ForwardingSandbox, user_idle_quiet_s=QUIET_S) as n:
        yield n


def request(iid: str, target: int = nodeagent_pb2.START_TARGET_RUNNING, *, args: Sequence[str] = (),
            image: str = "docker://registry.local/acme/echo:1", timeout_s: int = 10, pinned: str = "",
            health_path: str = "", env: dict[str, str] | None = None,
            gpu_bytes: int = 20 * GIB) -> nodeagent_pb2.StartInstanceRequest:
    spec = types_pb2.FunctionSpec(
        tenant="acme", namespace="team", name="echo", image=image, args=list(args), served_model_name=SERVED,
        registry_secret="acme-registry", health_path=health_path, http_port=8000, env=env or {"HF_HOME": "/tmp"},
        sample_request=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        resources=types_pb2.Resources(gpu_count=1, gpu_memory_bytes=gpu_bytes),
        policy=types_pb2.Policy(snapshot_mode=types_pb2.SNAPSHOT_MODE_PROCESS))
    return nodeagent_pb2.StartInstanceRequest(instance_id=iid, function_id="acme/team/echo", revision=1, spec=spec,
                                              target=target, gpu_index=0, timeout=Duration(seconds=timeout_s),  # type: ignore[arg-type]
                                              image_digest=pinned)


async def test_a_user_image_starts_ready_and_warmed_up_with_its_served_name(node: Node) -> None:
    iid = "i-00000000a001"
    inst = await operations.start_instance(node.agent, request(iid))
    assert (inst.state, inst.image_digest) == (InstanceState.INSTANCE_STATE_RUNNING, DIGEST)
    assert (await node.stored(iid)).image_digest == DIGEST
    assert node.images.pulls == [("docker://registry.local/acme/echo:1", "acme-registry")]
    built = node.sandbox.built[0]
    assert built.args == (sys.executable, str(STUB), "--served-model-name", SERVED)  # Entrypoint + Cmd
    assert built.env == {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/usr/local/cuda/lib64", "HF_HOME": "/tmp"}
    assert (built.container_port, built.cwd, built.gpu) == (8000, "/", True)
    async with httpx.AsyncClient() as http:
        models = (await http.get(f"http://{inst.endpoint}/v1/models")).json()
    assert models["posts"] == [f"/v1/chat/completions {SERVED} stream=False"]  # the warm-up, by the served name


async def test_the_deploy_validation_checkpoints_then_ends_the_container(node: Node) -> None:
    iid = "i-00000000a002"
    inst = await operations.start_instance(node.agent, request(iid, nodeagent_pb2.START_TARGET_SNAPSHOT))
    assert (inst.state, inst.message, inst.image_digest) == (InstanceState.INSTANCE_STATE_ENDED,
                                                             f"image {DIGEST} validated", DIGEST)
    assert [op for op, _ in node.checkpointer.calls] == ["checkpoint"]  # the GPU path a standby takes
    assert await node.containers.list() == [] and node.sandbox.released == [iid]
    assert node.images.released == [DIGEST]  # the image cache may evict it now
    assert await node.etcd.get(keys.snapshot_key("acme/team/echo", 1), types_pb2.Snapshot) is None  # the scheduler's


async def test_a_standby_without_health_is_probed_on_v1_models_and_restored(node: Node) -> None:
    iid = "i-00000000a003"
    args = ["--mode", "no-health", "--served-model-name", SERVED]
    standby = await operations.start_instance(node.agent, request(iid, nodeagent_pb2.START_TARGET_STANDBY, args=args))
    pid = node.agent.instances[iid].pid
    assert standby.state == InstanceState.INSTANCE_STATE_STANDBY and node.checkpointer.calls == [("checkpoint", pid)]
    assert node.agent.instances[iid].health_path == "/v1/models"
    resp = await operations.restore_instance(node.agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING and node.checkpointer.calls[-1] == ("restore", pid)
    parked = await operations.suspend_instance(node.agent, iid)  # no control socket to ask: parked as it is
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY and node.checkpointer.calls[-1] == ("checkpoint", pid)


async def test_a_standby_checkpoints_and_restores_every_process_of_its_container(node: Node) -> None:
    """A server that runs as a child of the container's init: the checkpoint takes both."""
    iid = "i-00000000a00c"
    req = request(iid, nodeagent_pb2.START_TARGET_STANDBY)
    req.spec.command[:] = ["/bin/sh", "-c", f"{sys.executable} {STUB} --served-model-name {SERVED} & wait"]
    standby = await operations.start_instance(node.agent, req)
    live = node.agent.instances[iid]
    pids = await node.containers.pids(live.container_id)
    assert standby.state == InstanceState.INSTANCE_STATE_STANDBY and len(pids) == 2 and pids[0] == live.pid
    assert node.checkpointer.calls == [("checkpoint", pid) for pid in pids] and live.cuda_pids == tuple(pids)
    await operations.restore_instance(node.agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert node.checkpointer.calls[len(pids):] == [("restore", pid) for pid in pids]


async def test_standbys_the_host_memory_cannot_hold_are_refused_but_the_validation_is_not(node: Node) -> None:
    # The node has 64 GiB, 51.2 GiB of it allowed (hostmem): a 60 GiB slice parked there would not fit.
    with pytest.raises(errors.ResourceExhausted, match="a standby of i-00000000a101 needs ~60.0 GiB"):
        await operations.start_instance(node.agent, request("i-00000000a101", nodeagent_pb2.START_TARGET_STANDBY,
                                                            gpu_bytes=60 * GIB))
    assert node.images.pulls == [] and "i-00000000a101" not in node.agent.instances  # refused before anything ran
    iid = "i-00000000a102"
    await operations.start_instance(node.agent, request(iid, gpu_bytes=60 * GIB))
    with pytest.raises(errors.ResourceExhausted, match=f"a standby of {iid} needs ~60"):
        await operations.suspend_instance(node.agent, iid)
    assert (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_IDLE and node.checkpointer.calls == []
    # The deploy validation's checkpoint is no standby: its container ends right after.
    inst = await operations.start_instance(node.agent, request("i-00000000a103", nodeagent_pb2.START_TARGET_SNAPSHOT,
                                                               gpu_bytes=60 * GIB))
    assert inst.state == InstanceState.INSTANCE_STATE_ENDED and [op for op, _ in node.checkpointer.calls] == ["checkpoint"]


@pytest.mark.parametrize(("args", "timeout_s", "needles"), [
    (["--mode", "exit"], 10, ["the container exited before it was ready (exit status 3)",
                              "RuntimeError: CUDA driver not found"]),
    (["--mode", "never-listen"], 2, ["did not become running within 2s", "GET /health on container port 8000",
                                     "nothing accepted a connection on the port", "never finishes loading"]),
    (["--mode", "refuse-warmup"], 10, ["warm-up request", "answered 400", "chat template missing"]),
    (["--served-model-name", "someone-else"], 10, ["warm-up request", "answered 404", f"`{SERVED}` does not exist"]),
], ids=["exits-at-once", "never-listens", "refuses-warm-up", "other-model-name"])
async def test_a_failed_start_says_why_with_the_output(node: Node, args: list[str], timeout_s: int,
                                                      needles: list[str]) -> None:
    iid = "i-00000000b001"
    with pytest.raises(errors.StartFailed) as info:
        await operations.start_instance(node.agent, request(iid, args=args, timeout_s=timeout_s))
    stored = await node.stored(iid)
    assert stored.state == InstanceState.INSTANCE_STATE_FAILED
    for needle in needles:
        assert needle in info.value.message and needle in stored.message
    assert await node.containers.list() == []


async def test_an_explicit_readiness_path_is_the_only_one_probed(node: Node) -> None:
    with pytest.raises(errors.StartFailed, match=r"GET /ready .* \(last: answered HTTP 404\)"):
        await operations.start_instance(node.agent, request("i-00000000b002", health_path="/ready", timeout_s=2))


async def test_a_start_is_pinned_to_the_revisions_digest(node: Node) -> None:
    await operations.start_instance(node.agent, request("i-00000000c001", pinned=DIGEST))
    assert node.images.pulls[-1] == (f"docker://registry.local/acme/echo@{DIGEST}", "acme-registry")  # by digest
    node.images.digest = "sha256:" + "77" * 32  # the archive on disk was replaced since the deploy
    with pytest.raises(errors.StartFailed, match=f"pinned to {DIGEST}; deploy a new revision"):
        await operations.start_instance(node.agent, request("i-00000000c002", image="oci-archive:/srv/echo.tar",
                                                            pinned=DIGEST))
    assert node.images.pulls[-1] == ("oci-archive:/srv/echo.tar", "acme-registry")  # a path cannot say a digest


async def test_what_no_retry_could_start_is_refused_before_anything_runs(node: Node) -> None:
    cases = [(request("i-00000000d001", image="docker://registry.local/Acme/echo"), "spec.image"),
             (request("i-00000000d002", env={"LD_PRELOAD": "/x.so"}), "spec.env")]
    for req, field_name in cases:
        with pytest.raises(errors.InvalidArgument) as info:
            await operations.start_instance(node.agent, req)
        assert info.value.field == field_name and req.instance_id not in node.agent.instances
    assert node.images.pulls == []
    node.agent.images = None
    with pytest.raises(errors.InvalidArgument, match="runs no user images") as info:
        await operations.start_instance(node.agent, request("i-00000000d003"))
    assert info.value.field == "spec.image"


async def test_a_container_that_dies_later_is_failed_with_its_exit_status(node: Node) -> None:
    iid = "i-00000000e001"
    await operations.start_instance(node.agent, request(iid))
    os.kill(node.agent.instances[iid].pid, signal.SIGKILL)
    for _ in range(100):
        await node.agent.reconcile_once()
        if (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_FAILED:
            break
    stored = await node.stored(iid)
    assert stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert "container exited unexpectedly (killed by signal 9)" in stored.message and f"serving {SERVED}" in stored.message


async def test_a_user_image_over_its_gpu_slice_is_failed_counting_all_its_processes(node: Node) -> None:
    iid = "i-00000000e002"
    await operations.start_instance(node.agent, request(iid, args=["--mode", "worker", "--served-model-name", SERVED]))
    init, worker = await node.containers.pids("sw-" + iid)  # the server and its engine process
    node.gpu.usage = {init: 12 * GIB, worker: 8 * GIB, os.getpid(): 40 * GIB}  # exactly its 20 GiB slice
    await node.agent.reconcile_once()
    assert (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_RUNNING
    assert node.agent.instances[iid].gpu_memory_used == 20 * GIB

    node.gpu.usage = {init: 12 * GIB, worker: 8 * GIB + (1 << 20)}  # neither alone is over; together they are
    await node.agent.reconcile_once()
    stored = await node.stored(iid)
    assert stored.state == InstanceState.INSTANCE_STATE_FAILED
    assert stored.message == "over its GPU memory slice: used 20481 MiB of 20480 MiB on GPU 0"  # no allowance
    assert await node.containers.list() == [] and node.sandbox.released == [iid] and node.images.released == [DIGEST]
async def _reconcile_until(node: Node, iid: str, want: int, limit_s: float = 5.0) -> types_pb2.Instance:
    """Reconcile passes until etcd shows ``want`` for ``iid`` (bounded), as the scheduler sees it."""
    deadline = time.monotonic() + limit_s
    while True:
        await node.agent.reconcile_once()
        stored = await node.stored(iid)
        if stored.state == want or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.05)


async def test_a_user_image_goes_idle_when_quiet_and_running_when_a_request_flows(forwarded_node: Node) -> None:
    node, iid = forwarded_node, "i-00000000f001"
    inst = await operations.start_instance(node.agent, request(iid))
    assert inst.state == InstanceState.INSTANCE_STATE_RUNNING
    running_since = inst.update_time.ToNanoseconds()  # ``inst`` is the node's own record: it moves on
    traffic = node.sandbox.traffic(iid)
    assert traffic is not None and time.monotonic() - traffic.last_moved < QUIET_S  # the warm-up went through it
    host, _, port = inst.endpoint.rpartition(":")
    # A connection that is open and silent, as a gateway's keep-alive one between requests (the
    # stub speaks HTTP/1.0 and closes each of its own).
    _, silent = await asyncio.open_connection(host, int(port))
    async with httpx.AsyncClient() as http:
        await node.agent.reconcile_once()  # the warm-up was just now: still busy
        assert (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_RUNNING

        assert (await http.get(f"http://{inst.endpoint}/health")).status_code == 200
        idle = await _reconcile_until(node, iid, InstanceState.INSTANCE_STATE_IDLE)
        assert idle.state == InstanceState.INSTANCE_STATE_IDLE
        quiet = node.sandbox.traffic(iid)
        assert quiet is not None and quiet.connections == 1  # open but silent: idle all the same
        assert time.monotonic() - quiet.last_moved >= QUIET_S
        assert idle.update_time.ToNanoseconds() > running_since  # the scheduler's idle clock starts now

        reply = await http.post(f"http://{inst.endpoint}/v1/chat/completions",
                                json={"model": SERVED, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        await node.agent.reconcile_once()  # within QUIET_S of the answer's bytes
        busy = await node.stored(iid)
        assert busy.state == InstanceState.INSTANCE_STATE_RUNNING
        assert busy.update_time.ToNanoseconds() > idle.update_time.ToNanoseconds()

        again = await _reconcile_until(node, iid, InstanceState.INSTANCE_STATE_IDLE)
        assert again.state == InstanceState.INSTANCE_STATE_IDLE
    silent.close()
    parked = await operations.suspend_instance(node.agent, iid)  # the scheduler parks an idle one
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY
    assert node.checkpointer.calls[-1] == ("checkpoint", node.agent.instances[iid].pid)
    await node.agent.reconcile_once()  # a standby is not serving: its silence moves nothing
    assert (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_STANDBY


async def test_a_running_user_image_suspended_before_it_went_quiet_is_parked(forwarded_node: Node) -> None:
    node, iid = forwarded_node, "i-00000000f002"
    await operations.start_instance(node.agent, request(iid))
    await node.agent.reconcile_once()
    assert (await node.stored(iid)).state == InstanceState.INSTANCE_STATE_RUNNING  # warm-up bytes just moved
    parked = await operations.suspend_instance(node.agent, iid)  # the scheduler holds no claim on it
    assert parked.state == InstanceState.INSTANCE_STATE_STANDBY
    restored = await operations.restore_instance(node.agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert restored.instance.state == InstanceState.INSTANCE_STATE_RUNNING
    assert (await _reconcile_until(node, iid, InstanceState.INSTANCE_STATE_IDLE)).state == InstanceState.INSTANCE_STATE_IDLE


@pytest.mark.parametrize(("command", "args", "want"), [
    ([], [], ("/entry", "--cmd")),
    (["/bin/serve"], [], ("/bin/serve",)),  # a command drops the image's Cmd
    ([], ["--port", "9000"], ("/entry", "--port", "9000")),
    (["/bin/serve"], ["-v"], ("/bin/serve", "-v")),
])
def test_command_lines_combine_as_in_kubernetes(command: list[str], args: list[str], want: tuple[str, ...]) -> None:
    spec = types_pb2.FunctionSpec(command=command, args=args)
    assert userimage.command_line(StubConfig(entrypoint=("/entry",), cmd=("--cmd",)), spec) == want


def test_an_image_with_nothing_to_run_needs_a_command() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        userimage.command_line(StubConfig(entrypoint=(), cmd=()), types_pb2.FunctionSpec())
    assert info.value.field == "spec.command"
