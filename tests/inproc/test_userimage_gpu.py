"""A user image's PROCESS-mode snapshot on a real GPU (``-m gpu``; run by bench/device/gpu_tests.sh).

The image is built here, from this machine's own Python (``bench.hostimage``: the interpreter,
``cuda.bindings`` and tests/gpu_image_server.py, no torch), as an OCI layout; the nodeagent
pulls it through its image cache (skopeo, umoci) and runs it in its sandbox (runc, user and
network namespaces, only the placed GPU's device nodes). Its server holds device memory in two
processes (the server and a worker it started), so the tests show that:

- the deploy validation and a standby checkpoint every CUDA process of the container and the
  standby holds 0 MiB of GPU memory (NVML, per process);
- a restore brings both back with their data intact (the answer checks every byte), and a park
  and a second restore do it again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bench.hostimage import build_host_python_image
from services.nodeagent import operations
from services.nodeagent.agent import NodeAgent
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.containers import RuncContainers
from services.nodeagent.gpu import CudaCheckpointer, device_minors, devices, discover, host_memory_bytes
from services.nodeagent.images import ImageCache
from services.nodeagent.sandbox import RuncSandbox
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

SERVER = Path(__file__).parent.parent / "gpu_image_server.py"
SERVED = "gpu-model"
MIB = 512
PROFILES = ("/usr/share/containers/seccomp.json", "/opt/debs/usr/share/containers/seccomp.json")


def _nvml_usage() -> dict[int, int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {int(p.pid): int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("gpu-image")
    root.chmod(0o755)
    layout = root / "layout"
    built = build_host_python_image(
        layout, "serve", keep=["cuda", "cuda_bindings", "cuda_pathfinder"],
        files={"/srv/server.py": SERVER.read_bytes()},
        config=[f"--config.entrypoint={sys.prefix}/bin/python3", "--config.entrypoint=/srv/server.py",
                "--config.cmd=--mib", f"--config.cmd={MIB}", f"--config.cmd=--served-model-name={SERVED}",
                "--config.env=PYTHONUNBUFFERED=1", "--config.exposedports=8000/tcp"])
    print("image build", json.dumps(built))
    return f"oci:{layout}:serve"


def _config(image: str) -> NodeAgentConfig:
    state = Path(tempfile.mkdtemp(prefix="swug-", dir="/tmp"))
    state.chmod(0o711)
    lib = "/usr/local/nvidia/lib64" if Path("/usr/local/nvidia/lib64/libcuda.so.1").exists() else ""
    layout_root = image.removeprefix("oci:").rsplit(":", 1)[0]
    config = NodeAgentConfig(
        name="gpu-node", state_dir=str(state), handover_socket=str(state / "hs" / "h.sock"), gpus="auto",
        seccomp_profile=next((p for p in PROFILES if Path(p).is_file()), PROFILES[0]),
        runc_binary=shutil.which("runc") or "runc", driver_lib_dir=lib, listen="127.0.0.1:0",
        blobstore="127.0.0.1:1", reconcile_interval=3600, start_timeout=120,
        image_local_roots=(str(Path(layout_root).parent),))
    config.image_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    return config


@pytest.fixture
async def agent(image: str) -> AsyncIterator[NodeAgent]:
    config = _config(image)
    gpus = discover()
    minors = device_minors()
    node_gpus = devices.discover({g.index: minors[g.index] for g in gpus}, config.driver_lib_dir)
    containers = RuncContainers(config.runc_root, binary=config.runc_binary)
    images = ImageCache(config.image_root, config.image_cache_max_bytes, None, id_base=config.userns_base,
                        local_roots=[Path(p) for p in config.image_local_roots])
    node = NodeAgent(config, FakeEtcd(), containers, CudaCheckpointer(), gpus, host_memory_bytes(),
                     node_gpus=node_gpus, images=images, sandbox=RuncSandbox(config, node_gpus))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
        await images.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


def _request(iid: str, image: str, target: int) -> nodeagent_pb2.StartInstanceRequest:
    spec = types_pb2.FunctionSpec(
        tenant="t", namespace="n", name="gpu", image=image, served_model_name=SERVED, http_port=8000,
        sample_request=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        resources=types_pb2.Resources(gpu_count=1, gpu_memory_bytes=4 << 30),
        policy=types_pb2.Policy(snapshot_mode=types_pb2.SNAPSHOT_MODE_PROCESS))
    return nodeagent_pb2.StartInstanceRequest(instance_id=iid, function_id="t/n/gpu", revision=1, spec=spec,
                                              target=target, gpu_index=0)


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _answer(endpoint: str) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        resp = await http.post(f"http://{endpoint}/v1/chat/completions",
                               json={"model": SERVED, "messages": [{"role": "user", "content": "check"}]})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


async def test_a_user_image_standby_holds_no_gpu_memory_and_restores_every_process(
        agent: NodeAgent, image: str) -> None:
    validated = await operations.start_instance(agent, _request("i-0000000b0001", image,
                                                                nodeagent_pb2.START_TARGET_SNAPSHOT))
    assert validated.state == InstanceState.INSTANCE_STATE_ENDED and validated.image_digest.startswith("sha256:")

    iid = "i-0000000b0002"
    standby = await operations.start_instance(agent, _request(iid, image, nodeagent_pb2.START_TARGET_STANDBY))
    live = agent.instances[iid]
    pids = await agent.containers.pids(live.container_id)
    assert standby.state == InstanceState.INSTANCE_STATE_STANDBY
    assert live.cuda_pids is not None and len(live.cuda_pids) == 2 and set(live.cuda_pids) <= set(pids)
    usage = _nvml_usage()
    assert [usage.get(pid, 0) for pid in pids] == [0] * len(pids), usage  # 0 MiB: all of it is in host memory
    rss = sum(_rss(pid) for pid in pids)
    assert rss >= 2 * (MIB << 20), rss  # both processes' device memory now lives in their host memory

    for _ in range(2):
        resp = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
        assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING
        usage = _nvml_usage()
        assert all(usage.get(pid, 0) >= MIB << 20 for pid in live.cuda_pids), usage
        assert await _answer(standby.endpoint) == "parent=ok child=ok"
        parked = await operations.suspend_instance(agent, iid)
        assert parked.state == InstanceState.INSTANCE_STATE_STANDBY
        assert all(_nvml_usage().get(pid, 0) == 0 for pid in live.cuda_pids)
    await operations.stop_instance(agent, iid)
