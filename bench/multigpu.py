"""``bench/multigpu``: placement across the GPUs of one node (issue 11's two-H100 run).

One node with every GPU of the machine, three functions of the built-in model server whose
slices are sized so that two instances cannot share one GPU (``--slice-gib``, default 55% of the smallest
card). Through the gateway, with the real ``openai`` client (``max_retries=0``):

  1. f1 and f2 are called at once: each is served, on different GPUs (the instances' ``gpu_index``
     and NVML's per-GPU memory both say so);
  2. f3 is called while both idle: the least recently used of f1/f2 is evicted (parked or
     stopped) and f3 is served on the GPU it freed;
  3. the evicted function is called again: its standby is on the GPU it parked on, so the least
     recently used instance of that GPU gives way and it restores there (a restore, ~1 s, beats
     evicting the less recently used f2 on the other GPU for a normal start, ~14 s).
A standby restores onto the GPU it was checkpointed on; each call records whether it was warm, a
restored standby or a normal start.
Each step records which instance served on which GPU, NVML's used memory per GPU, CS-TTFT, and
whether the step's expectation held. Results: JSON to ``--out`` (``bench/results/multigpu-h100x2.json``).

    python -m bench.multigpu --out bench/results/multigpu-h100x2.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from bench.coldstart import machine
from bench.models import make_random_llama
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.lifecycle import SERVING
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

GIB = 1 << 30
NAMES = ("f1", "f2", "f3")


def gpu_total_mib() -> list[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total) >> 20
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def gpu_used_mib() -> list[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used) >> 20
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _spec(name: str, model: Path, slice_bytes: int) -> types_pb2.FunctionSpec:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model))
    spec.resources.gpu_count = 1
    spec.resources.gpu_memory_bytes = slice_bytes
    p = spec.policy
    p.snapshot_mode, p.min_instances, p.max_instances = types_pb2.SNAPSHOT_MODE_ARENA, 0, 1
    p.standby_per_node, p.concurrency, p.queue_len = 1, 4, 16
    p.queue_timeout.FromSeconds(300)
    p.idle_timeout.FromSeconds(3600)  # eviction, not idling out, frees the GPU
    p.start_timeout.FromSeconds(300)
    return spec


class Run:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.admin = scheduler_pb2_grpc.SchedulerServiceStub(cluster.admin_channel())
        self.client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0,
                                    timeout=300)

    def deploy(self, spec: types_pb2.FunctionSpec) -> None:
        fid = f"default/default/{spec.name}"
        self.admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=30)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            f = self.admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=30).function
            if f.state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"{fid}: {f.status_message}")
            if f.state == types_pb2.FUNCTION_STATE_READY:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{fid} not READY")

    def wait_standbys(self, bound_s: float = 180) -> None:
        """READY comes before the standby is made: the calls start from standbys only."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            states = {i["function"] for i in self.instances() if i["state"] == "INSTANCE_STATE_STANDBY"}
            if states >= set(NAMES):
                return
            time.sleep(0.5)
        raise TimeoutError(f"no standby for every function within {bound_s} s: {self.instances()}")

    def wait_idle(self, name: str, bound_s: float = 30) -> None:
        """Until ``name``'s instance reports IDLE (only an idle instance may be evicted)."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if any(i["function"] == name and i["state"] == "INSTANCE_STATE_IDLE" for i in self.instances()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not IDLE within {bound_s} s: {self.instances()}")

    def instances(self) -> list[dict[str, Any]]:
        out = []
        for name in NAMES:
            req = scheduler_pb2.ListInstancesRequest(function_id=f"default/default/{name}")
            for i in self.admin.ListInstances(req, timeout=30).instances:
                out.append({"function": name, "id": i.id, "state": types_pb2.InstanceState.Name(i.state),
                            "gpu_index": i.gpu_index, "serving": i.state in SERVING})
        return out

    def serving_gpu(self, name: str) -> int | None:
        gpus = [i["gpu_index"] for i in self.instances() if i["function"] == name and i["serving"]]
        return gpus[0] if gpus else None

    def call(self, name: str) -> dict[str, Any]:
        before = self.instances()
        standbys = {i["id"]: i["gpu_index"] for i in before if i["function"] == name and i["state"] == "INSTANCE_STATE_STANDBY"}
        warm = {i["id"] for i in before if i["function"] == name and i["serving"]}
        out = self._call(name)
        served = [i for i in self.instances() if i["function"] == name and i["serving"]]
        iid = served[0]["id"] if served else None
        out.update(instance=iid, gpu_index=served[0]["gpu_index"] if served else None,
                   standbys_before=standbys,
                   start="warm" if iid in warm else "restored standby" if iid in standbys else "normal start")
        return out

    def _call(self, name: str) -> dict[str, Any]:
        t = time.monotonic()
        stream = self.client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, stream=True)
        ttft = None
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.monotonic() - t
        return {"function": name, "ttft_s": ttft, "total_s": time.monotonic() - t}

    def snapshot(self, what: str) -> dict[str, Any]:
        return {"step": what, "instances": self.instances(), "gpu_used_mib": gpu_used_mib()}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    totals = gpu_total_mib()
    # Sized so that two instances cannot share one GPU: over half of the smallest card.
    slice_gib = opts.slice_gib or int(min(totals) * 0.55) >> 10
    results: dict[str, Any] = {"benchmark": "multigpu", "machine": machine(), "gpu_total_mib": totals,
                               "slice_gib": slice_gib, "steps": []}

    def save() -> None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(results, indent=1))

    model = make_random_llama(opts.models_dir / "small", "small")
    results["gpus_at_start_mib"] = gpu_used_mib()
    if len(results["gpus_at_start_mib"]) < 2:
        raise SystemExit(f"this run needs two GPUs, the machine has {len(results['gpus_at_start_mib'])}")
    cfg = ClusterConfig(var_dir=opts.work_dir, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                        etcd_port=0, extra_args={
                            "blobstore": ["--gpu", "true"],
                            "nodeagent": ["--runc-binary", opts.runc, "--start-timeout", "300",
                                          "--model-roots", str(opts.models_dir), *opts.nodeagent_args]})
    slice_bytes = slice_gib * GIB
    with Cluster(cfg) as c:
        r = Run(c)
        for name in NAMES:
            r.deploy(_spec(name, model, slice_bytes))
        r.wait_standbys()
        results["steps"].append(r.snapshot("deployed: standbys only"))
        save()
        # 1. Two at once: one per GPU.
        with ThreadPoolExecutor(2) as pool:
            calls = list(pool.map(r.call, ["f1", "f2"]))
        step = r.snapshot("f1 and f2 at once")
        g1, g2 = r.serving_gpu("f1"), r.serving_gpu("f2")
        step.update(calls=calls, f1_gpu=g1, f2_gpu=g2,
                    gpu_growth_mib=[u - s for u, s in zip(step["gpu_used_mib"], results["gpus_at_start_mib"], strict=True)],
                    ok=g1 is not None and g2 is not None and g1 != g2
                    and all(u - s >= 1024 for u, s in zip(step["gpu_used_mib"][:2], results["gpus_at_start_mib"][:2], strict=True)))
        results["steps"].append(step)
        save()
        # 2. A third: the least recently used of f1/f2 (f1: called first, then f2 again) is evicted.
        r.call("f2")
        r.wait_idle("f1")
        r.wait_idle("f2")
        calls = [r.call("f3")]
        step = r.snapshot("f3 while f1 and f2 idle")
        g3 = r.serving_gpu("f3")
        step.update(calls=calls, f3_gpu=g3, f1_gpu=r.serving_gpu("f1"), f2_gpu=r.serving_gpu("f2"),
                    ok=g3 == g1 and r.serving_gpu("f1") is None and r.serving_gpu("f2") == g2)
        results["steps"].append(step)
        save()
        # 3. The evicted one again: its cold start lands where there is room (evicting LRU f2 or f3).
        r.wait_idle("f3")
        calls = [r.call("f1")]
        step = r.snapshot("f1 again")
        # f1 parked on g1 in step 2, so its standby is there: f3 (idle on g1) gives way and f1
        # restores, rather than evicting the less recently used f2 for a normal start on g2.
        step.update(calls=calls, f1_gpu=r.serving_gpu("f1"), f2_gpu=r.serving_gpu("f2"), f3_gpu=r.serving_gpu("f3"),
                    ok=r.serving_gpu("f1") == g1 and r.serving_gpu("f2") == g2 and r.serving_gpu("f3") is None
                    and calls[0]["start"] == "restored standby")
        results["steps"].append(step)
        save()
    results["all_ok"] = all(s.get("ok", True) for s in results["steps"])
    save()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.multigpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice-gib", type=int, default=0, help="GPU slice per function (default: 55%% of the smallest card)")
    p.add_argument("--models-dir", type=Path, default=Path("/var/tmp/snapwake-models"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/swmgpu"))
    p.add_argument("--out", type=Path, default=Path("bench/results/multigpu-h100x2.json"))
    p.add_argument("--runc", default="runc")
    opts, opts.nodeagent_args = p.parse_known_args(argv)
    r = run(opts)
    for s in r["steps"]:
        print(s["step"], "ok" if s.get("ok", True) else "NOT OK", s["gpu_used_mib"],
              [(i["function"], i["state"], i["gpu_index"]) for i in s["instances"]])
    return 0 if r["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
