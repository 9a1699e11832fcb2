"""``bench/coldstart``: cold-start time to first token, side by side, on one GPU machine.

For each model preset (Llama sizes, ``qwen3-4b``, ``gemma3-4b``, fp8 ``8b-fp8``: bench/models.py)
it measures, in one run (``--skip`` leaves modes out; ``--modes arena`` runs only (c)):
  (a) baseline: a fresh process loads the safetensors directory (page cache warm) with
      transformers onto the GPU and answers one request (what users have today);
  (b) process mode: the model server process, loaded and warmed, is driver-checkpointed whole
      (weights included) and restored; TTFT of the first request after the restore;
  (c) arena mode through the whole platform: etcd, scheduler, nodeagent (runc), blobstore and
      gateway; a request to the gateway for a function whose only instance is a zero-GPU
      standby, timed from sending to the first streamed token.
It also reports the blobstore's DMA rate, each standby's GPU memory and host RSS, and the time
to create the snapshot. Results: JSON to ``--out``; a markdown table on stdout.

    python -m bench.coldstart --preset 8b --out bench/results/coldstart-h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.models import PRESETS, describe, make_random_model
from snapwake.testing import free_port, wait_for

GIB = 1 << 30
PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]


def gpu_used_by(pid: int | None = None) -> int:
    """MiB of GPU memory: used by ``pid`` (0 when it holds none), or by the whole GPU."""
    if pid is None:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return int(out.split()[0])
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    for line in out.strip().splitlines():
        p, mem = (x.strip() for x in line.split(","))
        if int(p) == pid:
            return int(mem)
    return 0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def warm_page_cache(model: Path) -> float:
    t = time.monotonic()
    for f in sorted(model.iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.monotonic() - t


def baseline(model: Path) -> dict[str, Any]:
    """(a) fresh process, transformers from_pretrained to cuda, one forward."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "bench.baseline", str(model)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"baseline failed: {out.stderr[-2000:]}")
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {"ttft_s": wall, **inner}


def first_token(url: str, model: str, timeout: float = 300) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        ttft = None
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: ") and '"choices":[{' in line.replace(" ", ""):
                ttft = time.monotonic() - t0
        if ttft is not None:
            return ttft
    raise RuntimeError("stream ended without a token")


def process_mode(model: Path, slice_bytes: int, repeats: int) -> dict[str, Any]:
    """(b) whole-process driver checkpoint and restore of a loaded, warmed model server."""
    from services.nodeagent.gpu.checkpoint import CudaCheckpointer

    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    proc = subprocess.Popen([sys.executable, "-m", "modelserver", "--model-dir", str(model), "--port", str(port),
                             "--device", "cuda", "--gpu-index", "0", "--gpu-memory-bytes", str(slice_bytes),
                             "--start-mode", "load", "--control-socket", str(tmp / "c.sock"),
                             "--handover-socket", str(tmp / "h.sock")],
                            stdout=open(tmp / "log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 600, "model server (process mode)")
        load_s = time.monotonic() - t0
        warm = first_token(url, "m")
        running_mib = gpu_used_by(proc.pid)
        ck = CudaCheckpointer()
        rounds = []
        for _ in range(repeats):
            ckpt_s = asyncio.run(ck.checkpoint(proc.pid))
            standby_mib, standby_rss = gpu_used_by(proc.pid), rss_bytes(proc.pid)
            t = time.monotonic()
            restore_s = asyncio.run(ck.restore(proc.pid))
            ttft = first_token(url, "m")
            rounds.append({"checkpoint_s": ckpt_s, "restore_s": restore_s, "ttft_s": time.monotonic() - t,
                           "request_ttft_s": ttft, "standby_gpu_mib": standby_mib,
                           "standby_host_rss_bytes": standby_rss})
        return {"load_s": load_s, "warm_ttft_s": warm, "running_gpu_mib": running_mib, "rounds": rounds}
    finally:
        proc.kill()
        proc.wait(30)


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), help="model size (repeatable)")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/snapwake-models"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/snapwake-bench"))
    p.add_argument("--out", type=Path, default=Path("bench/results/coldstart-h100.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", action="append", default=[], choices=["baseline", "process", "arena"])
    p.add_argument("--modes", default="", help="comma-separated modes to run (baseline, process, arena); "
                   "the others are skipped")
    p.add_argument("--python-path", default="", help="extra import dirs for containers (carried wheels)")
    p.add_argument("--runc", default="runc")
    p.add_argument("--keep-models", action="store_true")
    return p


def machine() -> dict[str, Any]:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return {"gpu": gpu, "host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d")}


def summarize(results: dict[str, Any]) -> str:
    rows = ["| model | (a) baseline TTFT | (b) process restore TTFT | (c) arena CS-TTFT via gateway | "
            "(c) vs (a) | DMA GB/s | standby GPU MiB | standby RSS MiB | snapshot build |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        a = statistics.median([x["ttft_s"] for x in r.get("baseline", [])] or [float("nan")])
        b_r = r.get("process", {}).get("rounds", [])
        b = statistics.median([x["ttft_s"] for x in b_r] or [float("nan")])
        arena = r.get("arena", {})
        c = statistics.median(arena.get("cs_ttft_s", []) or [float("nan")])
        arch = f"{r.get('architecture', 'LlamaForCausalLM').removesuffix('ForCausalLM')}, {r.get('dtype', 'bfloat16')}"
        rows.append(f"| {name} ({arch}; {r['model_gb']:.1f} GB) | {a:.2f} s | {b:.2f} s | {c:.3f} s | {a / c:.0f}x | "
                    f"{arena.get('dma_gbps', float('nan')):.1f} | {arena.get('standby_gpu_mib', 'n/a')} | "
                    f"{arena.get('standby_rss_bytes', 0) / 2**20:.0f} | {arena.get('snapshot_build_s', float('nan')):.1f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    # Unknown flags go to the nodeagent (--seccomp-profile, --driver-lib-dir on the GPU machine).
    opts, opts.nodeagent_args = _bench_parser().parse_known_args(argv)
    if opts.modes:
        modes = {m.strip() for m in opts.modes.split(",") if m.strip()}
        unknown = modes - {"baseline", "process", "arena"}
        if unknown:
            raise SystemExit(f"--modes: unknown mode(s) {sorted(unknown)}; choose from baseline, process, arena")
        opts.skip = sorted({*opts.skip, *({"baseline", "process", "arena"} - modes)})
    from bench.coldstart_arena import arena_mode

    results: dict[str, Any] = {"benchmark": "coldstart", "machine": machine(), "models": {}}
    if opts.out.exists():
        results["models"] = json.loads(opts.out.read_text()).get("models", {})
    for preset in opts.preset or ["8b"]:
        r: dict[str, Any] = {}
        t = time.monotonic()
        model = make_random_model(opts.models_dir / preset, preset)
        r["generate_s"] = time.monotonic() - t
        r.update(describe(model))
        r["model_gb"] = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
        slice_bytes = int(r["model_gb"] * 1e9) + 6 * GIB
        r["page_cache_warm_read_s"] = warm_page_cache(model)

        def save(preset: str = preset, r: dict[str, Any] = r) -> None:
            results["models"][preset] = r
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(json.dumps(results, indent=1))

        if "baseline" not in opts.skip:
            r["baseline"] = [baseline(model) for _ in range(2)]
            save()
            print("baseline", r["baseline"], flush=True)
        if "arena" not in opts.skip:
            try:
                r["arena"] = arena_mode(model, preset, slice_bytes, opts)
            except Exception as exc:  # noqa: BLE001 - keep the other modes' numbers
                r["arena"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            print("arena", r["arena"], flush=True)
        if "process" not in opts.skip:
            try:
                r["process"] = process_mode(model, slice_bytes, opts.repeats)
            except Exception as exc:  # noqa: BLE001
                r["process"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            print("process", r["process"], flush=True)
        if not opts.keep_models:
            subprocess.run(["rm", "-rf", str(model)], check=False)
    print(summarize(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
