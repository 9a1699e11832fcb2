"""The instance sandbox on a real GPU (run by sandbox_gpu.sh on the GPU machine).

1. A sandboxed container (the nodeagent's own bundle, GPU nodes made by runc, the driver's
   files in /snapwake/driver) runs torch on CUDA; the host driver-checkpoints and restores it.
2. ``CudaArena`` with a node GPU index that differs from its CUDA ordinal, in the sandbox.
3. A whole nodeagent (FakeEtcd) starts the built-in model server on the GPU in the sandbox,
   serves a chat completion and a stream through the forwarder; a PROCESS-mode instance is
   suspended (driver checkpoint) and restored, then serves again.
Prints one JSON report; exits 1 if a step failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

from services.nodeagent import operations
from services.nodeagent.agent import NodeAgent
from services.nodeagent.bundle import IdMap, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import bundle_spec, make_work_dir
from services.nodeagent.containers import RuncContainers
from services.nodeagent.gpu import CudaCheckpointer, device_minors, devices, discover, host_memory_bytes
from services.nodeagent.machine import StartPlan
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1 import nodeagent_pb2, types_pb2

SITE, DEBS = os.environ.get("SITE", "/opt/snapwake-site"), "/opt/debs"
STATE, MODELS = Path("/tmp/sgx"), Path("/tmp/sgm")
TORCH_PROGRAM = """
import json, os, time, torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); x.fill_(7); torch.cuda.synchronize()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"ready": int(x[:: 1 << 20].sum()), "devices": torch.cuda.device_count(),
                  "name": torch.cuda.get_device_name(0), "uid_map": open("/proc/self/uid_map").read().split(),
                  "cap_eff": status["CapEff"].strip(), "seccomp": status["Seccomp"].strip(),
                  "dev": sorted(os.listdir("/dev")), "driver": sorted(os.listdir("/snapwake/driver"))}), flush=True)
n = 0
while n < 2:
    if os.path.exists(f"check{n}"):
        print(json.dumps({"check": n, "sum": int(x[:: 1 << 20].sum())}), flush=True); n += 1
    time.sleep(0.05)
"""
ARENA_PROGRAM = """
import json, os, torch
from modelserver.arena.cuda import CudaArena
a = CudaArena(7, 0, ordinal=0)
a.allocate(64 << 20); a.tensor().fill_(3); fd = a.export_fd(); os.close(fd)
print(json.dumps({"arena_sum": int(a.tensor()[:1024].sum()), "gpu": a.gpu, "ordinal": a.ordinal}), flush=True)
"""


def _config() -> NodeAgentConfig:
    lib = "/usr/local/nvidia/lib64" if Path("/usr/local/nvidia/lib64/libcuda.so.1").exists() else ""
    return NodeAgentConfig(name="gpu-node", state_dir=str(STATE), handover_socket=str(STATE / "hs" / "h.sock"),
                           python=sys.executable, python_path=(SITE,), model_roots=(str(MODELS),), gpus="auto",
                           seccomp_profile=f"{DEBS}/usr/share/containers/seccomp.json",
                           runc_binary=f"{DEBS}/usr/sbin/runc", driver_lib_dir=lib, listen="127.0.0.1:7070",
                           blobstore="127.0.0.1:1", reconcile_interval=0.5)


def _req(iid: str, model: Path, mode: int = types_pb2.SNAPSHOT_MODE_NONE) -> nodeagent_pb2.StartInstanceRequest:
    spec = types_pb2.FunctionSpec(tenant="t", namespace="n", name="demo", image="builtin", model_dir=str(model),
                                  resources=types_pb2.Resources(gpu_count=1, gpu_memory_bytes=8 << 30),
                                  sample_request=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2}))
    spec.policy.snapshot_mode = mode  # type: ignore[assignment]
    return nodeagent_pb2.StartInstanceRequest(instance_id=iid, function_id="t/n/demo", revision=1, spec=spec,
                                              target=nodeagent_pb2.START_TARGET_RUNNING, gpu_index=0)


def _text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


async def _lines(log: Path, want: int, limit_s: float = 120) -> list[dict[str, Any]]:
    for _ in range(int(limit_s * 10)):
        found = [json.loads(x) for x in _text(log).splitlines() if x.startswith("{")]
        if len(found) >= want:
            return found
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{log}: {_text(log)[-3000:] or 'no output'}")


async def _raw(config: NodeAgentConfig, runc: RuncContainers, gpu: Any, iid: str, program: str) -> tuple[int, Path]:
    idir = config.instances_dir / iid
    idir.mkdir(parents=True)
    make_work_dir(idir, IdMap())
    spec = bundle_spec(config, _req(iid, MODELS / "demo"), StartPlan.RUNNING, 8000, idir, gpu)
    spec = dataclasses.replace(spec, args=(sys.executable, "-c", program))
    pid = await runc.run("gx-" + iid, write_bundle(idir / "bundle", spec, config.rootfs_base / iid), idir / "output.log")
    return pid, idir


async def step_torch(config: NodeAgentConfig, runc: RuncContainers, gpu: Any, report: dict[str, Any]) -> None:
    pid, idir = await _raw(config, runc, gpu, "i-000000000001", TORCH_PROGRAM)
    report["torch"] = (await _lines(idir / "output.log", 1))[0]
    ckpt = CudaCheckpointer()
    for n in range(2):
        report[f"checkpoint_s_{n}"] = await ckpt.checkpoint(pid)
        report[f"restore_s_{n}"] = await ckpt.restore(pid)
        (idir / "work" / f"check{n}").touch()
    report["after_restores"] = (await _lines(idir / "output.log", 3))[1:]


async def step_arena(config: NodeAgentConfig, runc: RuncContainers, gpu: Any, report: dict[str, Any]) -> None:
    _, idir = await _raw(config, runc, gpu, "i-000000000002", ARENA_PROGRAM)
    report["arena"] = (await _lines(idir / "output.log", 1))[0]


async def _chat(endpoint: str) -> dict[str, Any]:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with httpx.AsyncClient(timeout=60) as http:
        plain = await http.post(f"http://{endpoint}/v1/chat/completions", json=body)
        events = 0
        async with http.stream("POST", f"http://{endpoint}/v1/chat/completions", json={**body, "stream": True}) as s:
            async for line in s.aiter_lines():
                events += line.startswith("data: ")
    return {"status": plain.status_code, "text": plain.json()["choices"][0]["message"]["content"], "sse_events": events}


async def step_nodeagent(config: NodeAgentConfig, gpus: list[types_pb2.Gpu], node_gpus: Any,
                         report: dict[str, Any]) -> None:
    agent = NodeAgent(config, FakeEtcd(), RuncContainers(config.runc_root, binary=config.runc_binary),
                      CudaCheckpointer(), gpus, host_memory_bytes(), node_gpus=node_gpus)
    await agent.start()
    try:
        t = time.monotonic()
        inst = await operations.start_instance(agent, _req("i-00000000000a", MODELS / "demo"))
        report["builtin_start_s"] = time.monotonic() - t
        report["builtin_chat"] = await _chat(inst.endpoint)
        proc = await operations.start_instance(agent, _req("i-00000000000b", MODELS / "demo", types_pb2.SNAPSHOT_MODE_PROCESS))
        suspended = await operations.suspend_instance(agent, proc.id)
        report["process_suspended"] = types_pb2.InstanceState.Name(suspended.state)
        restored = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=proc.id, gpu_index=0))
        report["process_restore_s"] = restored.restore_duration.ToTimedelta().total_seconds()
        report["process_chat"] = await _chat(proc.endpoint)
        report["logs_tail"] = (agent.instances[proc.id].log_path.read_text()[-600:])
    finally:
        await agent.stop()


def _model() -> None:
    from modelserver.demo import make_demo_model

    MODELS.mkdir(mode=0o755, exist_ok=True)
    make_demo_model(MODELS / "demo", seed=0)


async def main() -> int:
    _model()
    config = _config()
    gpus = discover()
    minors = device_minors()
    node_gpus = devices.discover({g.index: minors[g.index] for g in gpus}, config.driver_lib_dir)
    report: dict[str, Any] = {"gpus": [g.name for g in gpus], "minors": minors,
                              "devices": [d.path for d in node_gpus.access(0).devices],
                              "driver_files": [p for p, _ in node_gpus.mounts], "links": node_gpus.symlinks}
    config.instances_dir.mkdir(parents=True, exist_ok=True)
    config.rootfs_base.mkdir(parents=True, exist_ok=True, mode=0o711)
    runc = RuncContainers(config.runc_root, binary=config.runc_binary, prefix="gx-")
    failed = False
    for name, step in (("torch", lambda: step_torch(config, runc, node_gpus.access(0), report)),
                       ("arena", lambda: step_arena(config, runc, node_gpus.access(0), report))):
        try:
            await step()
        except Exception:  # noqa: BLE001 - report every step
            report[f"{name}_error"] = traceback.format_exc()[-3000:]
            failed = True
    for state in await runc.list():
        await runc.delete(state.id)
    try:
        await step_nodeagent(config, gpus, node_gpus, report)
    except Exception:  # noqa: BLE001
        report["nodeagent_error"] = traceback.format_exc()[-4000:]
        failed = True
    print(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
