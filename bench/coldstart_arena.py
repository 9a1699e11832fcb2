"""(c) of ``bench/coldstart``: arena-mode cold starts through the whole platform."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.coldstart import first_token
from snapwake import keys, protocols
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.lifecycle import SERVING
from snapwake.pki import Identity
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState


def _spec(name: str, model: Path, slice_bytes: int) -> types_pb2.FunctionSpec:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model))
    spec.resources.gpu_count = 1
    spec.resources.gpu_memory_bytes = slice_bytes
    p = spec.policy
    p.snapshot_mode, p.min_instances, p.max_instances = types_pb2.SNAPSHOT_MODE_ARENA, 0, 1
    p.standby_per_node, p.concurrency, p.queue_len = 1, 4, 16
    p.queue_timeout.FromSeconds(600)
    p.idle_timeout.FromSeconds(3600)
    p.start_timeout.FromSeconds(600)
    return spec


def _wait(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def _gpu_apps() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    apps = {}
    for line in out.strip().splitlines():
        pid, mem = (x.strip() for x in line.split(","))
        apps[int(pid)] = int(mem)
    return apps


def _dma(handover: str, sid: str) -> dict[str, float]:
    """One handover ``load`` onto GPU 0 through the blobstore, as a model server would do it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(handover)
        t = time.monotonic()
        protocols.send_message(s, {"op": "load", "snapshot_id": sid, "gpu": 0})
        reply, fds = protocols.recv_message(s)
        wall = time.monotonic() - t
        for fd in fds:
            os.close(fd)
        protocols.send_message(s, {"op": "mapped"})
    if not reply.get("ok"):
        raise RuntimeError(f"handover load failed: {reply.get('error')}")
    return {"bytes": reply["bytes"], "dma_s": reply["dma_seconds"], "handover_wall_s": wall,
            "dma_gbps": reply["bytes"] / reply["dma_seconds"] / 1e9}


def arena_mode(model: Path, preset: str, slice_bytes: int, opts: argparse.Namespace) -> dict[str, Any]:
    var = opts.work_dir / preset
    shutil.rmtree(var, ignore_errors=True)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cfg = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                        etcd_port=0, extra_args={
                            "blobstore": ["--cache-bytes", str(model_bytes + (2 << 30)), "--gpu", "true",
                                          "--chunk-bytes", str(256 << 20)],
                            "nodeagent": ["--runc-binary", opts.runc, "--start-timeout", "600",
                                          "--model-roots", str(model.parent),
                                          *(["--python-path", opts.python_path] if opts.python_path else [])]})
    name = f"llama-{preset}"
    fid = f"default/default/{name}"
    r: dict[str, Any] = {}
    with Cluster(cfg) as c, c.admin_channel() as ch:
        admin = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        t0 = time.monotonic()
        admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=_spec(name, model, slice_bytes)), timeout=30)

        def ready() -> bool:
            f = admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=30).function
            if f.state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"function failed: {f.status_message}")
            return f.state == types_pb2.FUNCTION_STATE_READY

        _wait("function READY", ready, 900)
        r["ready_s"] = time.monotonic() - t0
        snaps = admin.ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=fid), timeout=30).snapshots
        r["snapshot_build_s"] = max((s.build_duration.ToTimedelta().total_seconds() for s in snaps), default=r["ready_s"])
        r["snapshot_bytes"] = max((s.total_bytes or s.bytes_written for s in snaps), default=0)

        def instances() -> list[types_pb2.Instance]:
            return list(admin.ListInstances(scheduler_pb2.ListInstancesRequest(function_id=fid), timeout=30).instances)

        def settled_standby() -> types_pb2.Instance | None:
            inst = instances()
            busy = [i for i in inst if i.state in (InstanceState.INSTANCE_STATE_CREATING, InstanceState.INSTANCE_STATE_STARTING,
                                                   InstanceState.INSTANCE_STATE_RESTORING)]
            standby = [i for i in inst if i.state == InstanceState.INSTANCE_STATE_STANDBY]
            return standby[0] if standby and not busy else None

        sb = _wait("a settled STANDBY instance", settled_standby, 900)
        r["standby_ready_s"] = time.monotonic() - t0
        # The nodeagent samples RSS on its reconcile pass (1 s); give it two passes.
        time.sleep(2.5)
        sb = next(i for i in instances() if i.id == sb.id)
        blob_pid = c.procs["blobstore"].pid
        apps = _gpu_apps()
        r["gpu_apps_at_standby_mib"] = {str(p): m for p, m in apps.items()}
        # The bench itself made the weights on this GPU; the blobstore holds its context and
        # pinned cache. Everything else on the GPU belongs to the standby.
        r["standby_gpu_mib"] = sum(m for p, m in apps.items() if p not in (blob_pid, os.getpid()))
        r["standby_rss_bytes"] = sb.host_rss_bytes
        na = nodeagent_pb2_grpc.NodeAgentServiceStub(c.channel_as("nodeagent", Identity("scheduler", "scheduler")))
        r["cs_ttft_s"], r["warm_ttft_s"], r["restore_s"] = [], [], []
        for _ in range(opts.repeats):
            sb = _wait("a settled STANDBY instance", settled_standby, 900)
            r["cs_ttft_s"].append(first_token(c.gateway_url, name))
            r["warm_ttft_s"].append(first_token(c.gateway_url, name))
            served = [i for i in instances() if i.state in SERVING]
            r["restore_s"].append(max((i.last_start_seconds for i in served), default=0.0))
            for i in served:
                na.SuspendInstance(nodeagent_pb2.SuspendInstanceRequest(instance_id=i.id), timeout=120)
        handover = str(var / "blobstore" / "handover.sock")
        r["dma"] = [_dma(handover, keys.snapshot_id(fid, 1)) for _ in range(3)]
        r["dma_gbps"] = max(d["dma_gbps"] for d in r["dma"])
    return r
