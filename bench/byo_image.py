"""``bench/byo_image``: a server we did not write, in a user image, through the whole platform.

The image is Hugging Face's OpenAI-compatible ``transformers serve`` built on the GPU machine
from its own Python environment (``bench.hostimage``: the interpreter, torch, transformers and
the serving wheels carried in ``.whl``, as an ``oci:`` layout). It serves the 8B bench model
(random weights, Llama-3.1-8B shapes) from a local dir the node binds at /snapwake/model. In one
run, through etcd, scheduler, gateway, nodeagent (runc sandbox, image cache) and blobstore:

  (a) normal start: a function with ``snapshot_mode: NONE`` and no instance; a request to the
      gateway waits for the container to start, import torch, load the model and answer: time
      from sending to the first streamed content token;
  (b) process mode: a function with ``snapshot_mode: PROCESS`` whose only instance is a
      zero-GPU standby (every CUDA process of the container driver-checkpointed into host
      memory); CS-TTFT through the gateway, the driver restore's seconds, the standby's GPU
      memory (NVML, per process of the container) and host memory (PSS and RSS, from the node).
Both answer the same prompt; the texts are compared. Results: JSON to ``--out``, a table on stdout.

    python -m bench.byo_image --out bench/results/byo-image-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.coldstart import machine, warm_page_cache
from bench.hostimage import build_host_python_image
from bench.models import make_random_llama
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.lifecycle import SERVING
from snapwake.pki import Identity
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

GIB = 1 << 30
SERVED = "/snapwake/model"  # transformers serve pins requests to the model it preloaded, by its path
PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]
# Site-packages the server never imports (JAX, CuPy, data science, vision): an image holds what it needs.
DROP = ["jax", "jaxlib", "jax_plugins", "jax_cuda13_plugin", "jax_cuda13_pjrt", "cupy", "cupyx", "cupy_backends",
        "cupy_cuda13x", "pyarrow", "llvmlite", "numba", "numba_cuda", "cmake", "sklearn", "scikit_learn", "scipy",
        "pandas", "cv2", "opencv_python_headless", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "tensorstore",
        "statsmodels", "matplotlib", "skimage", "scikit_image", "torchvision", "torchaudio", "torch_geometric",
        "tensorboard", "tensorboard_data_server", "orbax", "orbax_checkpoint", "flax", "optax", "chex", "equinox",
        "diffrax", "numpyro", "botorch", "gpytorch", "linear_operator", "lightning", "pytorch_lightning", "timm",
        "sentence_transformers", "e3nn", "xarray", "seaborn", "fontTools", "mpi4py", "h5py", "tifffile",
        "imageio", "pyre_extensions", "cython", "Cython", "pybind11", "nanobind", "meson", "ninja", "mesonbuild"]
WHEELS = ["fastapi", "starlette", "uvicorn", "openai", "jiter", "distro", "sniffio", "opentelemetry_api", "pydantic",
          "pydantic_core", "annotated_types", "typing_inspection", "httpx2", "httpcore2"]


# What the model dir looks like from inside the image's sandbox (``--diagnose``).
DIAGNOSE = """
import mmap, os, sys
p = "/snapwake/model"; f = p + "/model-00001.safetensors"
print("ls", sorted(os.listdir(p)), "uid", os.getuid(), open("/proc/self/uid_map").read().split())
print("stat", os.stat(f))
with open(f, "rb") as fh:
    print("read", len(fh.read(100)))
    m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ); print("mmap", len(m))
from safetensors import safe_open
for b in ("mmap", "pread"):
    try:
        print(b, "ok", len(list(safe_open(f, "pt", device="cpu", backend=b).keys())))
    except Exception as e:
        print(b, "fail", repr(e))
sys.exit(3)
"""


def build_image(layout: Path, wheels_dir: Path) -> dict[str, Any]:
    wheels = [w for name in WHEELS for w in sorted(wheels_dir.glob(f"{name}-*.whl"))]
    serve = Path(sys.prefix) / "bin" / "transformers"
    shutil.rmtree(layout, ignore_errors=True)
    return build_host_python_image(layout, "serve", drop=DROP, wheels=wheels, config=[
        f"--config.entrypoint={serve}", "--config.entrypoint=serve",
        f"--config.cmd={SERVED}", "--config.cmd=--host", "--config.cmd=0.0.0.0", "--config.cmd=--port",
        "--config.cmd=8000", "--config.cmd=--dtype", "--config.cmd=bfloat16",
        "--config.env=HF_HUB_OFFLINE=1", "--config.env=HF_HOME=/tmp/hf", "--config.env=PYTHONUNBUFFERED=1",
        "--config.env=TRANSFORMERS_VERBOSITY=info", "--config.exposedports=8000/tcp"])


def _spec(name: str, image: str, model: Path, mode: int, slice_bytes: int) -> types_pb2.FunctionSpec:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image=image, model_dir=str(model),
                                  served_model_name=SERVED, http_port=8000, health_path="/health")
    spec.sample_request = json.dumps({"messages": PROMPT, "max_tokens": 4})
    spec.resources.gpu_count = 1
    spec.resources.gpu_memory_bytes = slice_bytes
    spec.resources.host_memory_bytes = 64 * GIB  # room for the standby's GPU state in host memory
    spec.resources.cpu_millis = 8000
    p = spec.policy
    p.snapshot_mode, p.min_instances, p.max_instances = mode, 0, 1  # type: ignore[assignment]
    p.standby_per_node = 1 if mode == types_pb2.SNAPSHOT_MODE_PROCESS else 0
    p.concurrency, p.queue_len = 4, 16
    p.queue_timeout.FromSeconds(600)
    p.idle_timeout.FromSeconds(3600)
    p.start_timeout.FromSeconds(600)
    return spec


def _wait(what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def first_content(url: str, model: str, timeout: float = 600) -> tuple[float, str]:
    """Seconds from sending a streamed chat request to its first non-empty content delta, and
    the whole text."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 16, "stream": True}
    t0 = time.monotonic()
    ttft, text = None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                ttft = ttft if ttft is not None else time.monotonic() - t0
                text.append(delta["content"])
    if ttft is None:
        raise RuntimeError("the stream ended without content")
    return ttft, "".join(text)


def _gpu_apps() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(p): int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}


class Bench:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.ch = cluster.admin_channel()
        self.admin = scheduler_pb2_grpc.SchedulerServiceStub(self.ch)
        self.na = nodeagent_pb2_grpc.NodeAgentServiceStub(cluster.channel_as("nodeagent", Identity("scheduler", "scheduler")))

    def deploy(self, spec: types_pb2.FunctionSpec) -> float:
        fid = f"{spec.tenant}/{spec.namespace}/{spec.name}"
        t0 = time.monotonic()
        self.admin.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=30)

        def ready() -> bool:
            f = self.admin.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=30).function
            if f.state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"{fid} failed: {f.status_message}")
            return f.state == types_pb2.FUNCTION_STATE_READY

        _wait(f"{fid} READY", ready, 900)
        return time.monotonic() - t0

    def instances(self, name: str) -> list[types_pb2.Instance]:
        req = scheduler_pb2.ListInstancesRequest(function_id=f"default/default/{name}")
        return list(self.admin.ListInstances(req, timeout=30).instances)

    def settled_standby(self, name: str) -> types_pb2.Instance | None:
        inst = self.instances(name)
        moving = [i for i in inst if i.state in (InstanceState.INSTANCE_STATE_CREATING, InstanceState.INSTANCE_STATE_STARTING,
                                                 InstanceState.INSTANCE_STATE_RESTORING)]
        standby = [i for i in inst if i.state == InstanceState.INSTANCE_STATE_STANDBY]
        return standby[0] if standby and not moving else None

    def stop_all(self, name: str) -> None:
        for i in self.instances(name):
            if i.state in SERVING or i.state == InstanceState.INSTANCE_STATE_STANDBY:
                self.na.StopInstance(nodeagent_pb2.StopInstanceRequest(instance_id=i.id), timeout=120)
        _wait(f"{name}: no live instance", lambda: not [i for i in self.instances(name) if i.state in SERVING
                                                       or i.state == InstanceState.INSTANCE_STATE_STANDBY], 120)

    def park_all(self, name: str) -> None:
        for i in self.instances(name):
            if i.state in SERVING:
                self.na.SuspendInstance(nodeagent_pb2.SuspendInstanceRequest(instance_id=i.id), timeout=300)


def _container_pids(cluster: Cluster, runc: str, iid: str) -> list[int]:
    root = cluster.state_dir("nodeagent") / "runc"
    out = subprocess.run([runc, "--root", str(root), "ps", "--format", "json", f"sw-{iid}"], capture_output=True,
                         text=True, timeout=30).stdout
    return [int(p) for p in json.loads(out or "[]") or []]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "byo-image", "machine": machine(), "server": "transformers serve",
                               "preset": opts.preset}

    def save() -> None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(results, indent=1))

    t = time.monotonic()
    model = make_random_llama(opts.models_dir / opts.preset, opts.preset)
    results["model_gb"] = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    results["generate_s"] = time.monotonic() - t
    # The container's ids are not the host's: the model must be readable by others, as a node's
    # model dirs are (safetensors writes its shards 0600).
    os.chmod(opts.models_dir, 0o755)
    for f in model.iterdir():
        f.chmod(0o644)
    results["image"] = build_image(opts.layout, opts.wheels)
    image = f"oci:{opts.layout}:serve"
    save()
    print("image", results["image"], flush=True)
    results["page_cache_warm_read_s"] = warm_page_cache(model)
    slice_bytes = int(results["model_gb"] * 1e9) + 8 * GIB
    var = opts.work_dir
    subprocess.run(["rm", "-rf", str(var)], check=False)
    cfg = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0, etcd_port=0,
                        extra_args={"nodeagent": ["--runc-binary", opts.runc, "--start-timeout", "900",
                                                  "--model-roots", str(opts.models_dir),
                                                  "--image-local-roots", str(opts.layout.parent),
                                                  *opts.nodeagent_args]})
    with Cluster(cfg) as c:
        b = Bench(c)
        if opts.diagnose:
            diag = _spec("tf-diag", image, model, types_pb2.SNAPSHOT_MODE_NONE, slice_bytes)
            diag.command[:] = [f"{sys.prefix}/bin/python3", "-c", DIAGNOSE]
            try:
                b.deploy(diag)
            except RuntimeError as exc:  # it exits on purpose: the reason carries its output
                results["diagnose"] = str(exc)[-1800:]
            print("diagnose", results.get("diagnose"), flush=True)
            save()
            return results
        normal: dict[str, Any] = {}
        results["normal"] = normal
        normal["deploy_s"] = b.deploy(_spec("tf-normal", image, model, types_pb2.SNAPSHOT_MODE_NONE, slice_bytes))
        normal["note"] = "deploy_s includes the first pull and unpack of the image into the node's cache"
        save()
        normal["ttft_s"], normal["texts"] = [], []
        for _ in range(opts.normal_repeats):
            ttft, text = first_content(c.gateway_url, "tf-normal")
            normal["ttft_s"].append(ttft)
            normal["texts"].append(text)
            running = [i for i in b.instances("tf-normal") if i.state in SERVING]
            normal["gpu_mib"] = sum(_gpu_apps().values())
            normal["host_rss_bytes"] = max((i.host_rss_bytes for i in running), default=0)
            b.stop_all("tf-normal")
            save()
        print("normal", normal, flush=True)
        proc: dict[str, Any] = {}
        results["process"] = proc
        proc["deploy_s"] = b.deploy(_spec("tf-process", image, model, types_pb2.SNAPSHOT_MODE_PROCESS, slice_bytes))
        t = time.monotonic()
        sb = _wait("a settled STANDBY", lambda: b.settled_standby("tf-process"), 900)
        proc["standby_ready_s"] = time.monotonic() - t
        time.sleep(2.5)  # two reconcile passes: the node samples host memory
        sb = next(i for i in b.instances("tf-process") if i.id == sb.id)
        pids = _container_pids(c, opts.runc, sb.id)
        apps = _gpu_apps()
        proc["standby_pids"] = pids
        proc["gpu_apps_at_standby_mib"] = {str(p): m for p, m in apps.items()}
        proc["standby_gpu_mib"] = sum(apps.get(p, 0) for p in pids)
        proc["standby_host_pss_bytes"], proc["standby_host_rss_bytes"] = sb.host_pss_bytes, sb.host_rss_bytes
        save()
        proc.update(cs_ttft_s=[], warm_ttft_s=[], restore_s=[], texts=[], park_s=[])
        for _ in range(opts.repeats):
            _wait("a settled STANDBY", lambda: b.settled_standby("tf-process"), 600)
            ttft, text = first_content(c.gateway_url, "tf-process")
            proc["cs_ttft_s"].append(ttft)
            proc["texts"].append(text)
            proc["warm_ttft_s"].append(first_content(c.gateway_url, "tf-process")[0])
            served = [i for i in b.instances("tf-process") if i.state in SERVING]
            proc["restore_s"].append(max((i.last_start_seconds for i in served), default=0.0))
            t = time.monotonic()
            b.park_all("tf-process")
            proc["park_s"].append(time.monotonic() - t)
            save()
        print("process", proc, flush=True)
    a = statistics.median(normal["ttft_s"])
    p = statistics.median(proc["cs_ttft_s"])
    results["summary"] = {"normal_ttft_median_s": a, "process_cs_ttft_median_s": p, "speedup": a / p,
                          "same_text": len(set(normal["texts"] + proc["texts"])) == 1,
                          "target_cs_ttft_s": 3.5, "target_speedup": 5.0}
    save()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.byo_image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="8b")
    p.add_argument("--models-dir", type=Path, default=Path("/var/tmp/snapwake-models"))
    p.add_argument("--layout", type=Path, default=Path("/var/tmp/snapwake-images/transformers-serve"))
    p.add_argument("--wheels", type=Path, default=Path(".whl"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/swbyo"))
    p.add_argument("--out", type=Path, default=Path("bench/results/byo-image-h100.json"))
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--normal-repeats", type=int, default=2)
    p.add_argument("--runc", default="runc")
    p.add_argument("--diagnose", action="store_true", help="only show the model dir from inside the sandbox")
    opts, opts.nodeagent_args = p.parse_known_args(argv)  # the rest are nodeagent flags
    r = run(opts)
    if opts.diagnose:
        return 0
    s = r["summary"]
    print("| server | model | normal start TTFT | process-mode CS-TTFT | speedup | standby GPU | standby host PSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| transformers serve | {r['preset']} ({r['model_gb']:.1f} GB) | {s['normal_ttft_median_s']:.2f} s | "
          f"{s['process_cs_ttft_median_s']:.2f} s | {s['speedup']:.1f}x | {r['process']['standby_gpu_mib']} MiB | "
          f"{r['process']['standby_host_pss_bytes'] / GIB:.1f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
