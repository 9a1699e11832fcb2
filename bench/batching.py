"""bench/batching: what continuous batching and CUDA graphs buy one instance on one GPU.

For each preset, one model server ``Instance`` (CUDA arena, its GPU slice, the paged KV pool) serves
``--requests`` requests at concurrency 1 (the old engine's behaviour: one request at a time,
which is the baseline) and at higher concurrencies. It reports aggregate decode tokens/s,
TTFT and inter-token latency percentiles, and GPU busy (NVML) per run; ratios are against
concurrency 1 of the same run. Each preset runs with decode CUDA graphs and without
(``--modes``). TTFT is the time to the first piece of text (random weights often produce ids
the demo tokenizer decodes to nothing, which delays it); ITL is per token, averaged per request.
Results: ``bench/results/batching-h100.json``.

    python -m bench.batching --presets small,8b --concurrency 1,8,32 --requests 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.density import percentile

__all__ = ["main"]


def _nvml_busy() -> Callable[[], float | None]:
    """Starts sampling NVML GPU utilisation every 50 ms; the function it returns stops the
    sampler and gives the mean."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    samples: list[int] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.05):
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def done() -> float | None:
        stop.set()
        t.join(2)
        return statistics.fmean(samples) if samples else None
    return done


def run_load(instance: Any, concurrency: int, requests: int, prompt_len: int, max_tokens: int) -> dict[str, Any]:
    """``requests`` requests, at most ``concurrency`` at once; per-request TTFT and token times."""
    from modelserver.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    lock = threading.Lock()
    next_i = [0]
    ttft: list[float] = []
    itl: list[float] = []
    tokens = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= requests:
                    return
                next_i[0] += 1
            prompt = [1] + [(7 * i + 13 * j) % 500 + 3 for j in range(prompt_len - 1)]
            t0 = time.monotonic()
            stamps: list[float] = []
            last = [0]

            counts: list[int] = []

            def emit(piece: Any, stamps: list[float] = stamps, last: list[int] = last,
                     counts: list[int] = counts) -> None:
                stamps.append(time.monotonic())
                counts.append(piece.completion_tokens)
                last[0] = piece.completion_tokens

            instance.run(prompt, params, threading.Event(), emit)
            with lock:
                if stamps:
                    ttft.append(stamps[0] - t0)
                    # Random weights often pick ids the demo tokenizer decodes to "", so pieces
                    # are sparse: the inter-token latency is time over tokens between pieces.
                    if counts[-1] > counts[0]:
                        itl.append((stamps[-1] - stamps[0]) / (counts[-1] - counts[0]))
                tokens[0] += last[0]

    busy_done = _nvml_busy()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.monotonic() - t0
    busy = busy_done()
    ttft.sort()
    itl.sort()
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3),
            "generated_tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 1),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p99_ms": _ms(percentile(itl, 99)),
            "gpu_busy_pct": busy, "engine": dict(instance.engine.stats)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def bench_preset(preset: str, models_dir: Path, args: argparse.Namespace, graphs: bool) -> dict[str, Any]:
    from bench.models import describe, make_random_model
    from modelserver.__main__ import load_tokenizer
    from modelserver.arena import make_arena
    from modelserver.instance import Instance, Settings

    model = make_random_model(models_dir / preset, preset)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    slice_bytes = weights + max(2 << 30, weights // 4)
    inst = Instance(Settings(model, gpu_memory_bytes=slice_bytes, max_batch=max(args.concurrency),
                             cuda_graphs=graphs),
                    make_arena("cuda", 0, slice_bytes), load_tokenizer(model))
    load = inst.load_from_dir()
    assert inst.engine is not None
    out: dict[str, Any] = {"preset": preset, **describe(model), "cuda_graphs": graphs, "weights_bytes": weights, "slice_bytes": slice_bytes,
                           "kv_pool_tokens": inst.engine.pool.tokens, "load_s": round(load["seconds"], 2),
                           "runs": []}
    for c in args.concurrency:  # warm-up: kernels, allocator, the graphs of each batch size
        run_load(inst, c, 2 * c, args.prompt_len, 8)
    for c in args.concurrency:
        r = run_load(inst, c, max(args.requests, c), args.prompt_len, args.max_tokens)
        out["runs"].append(r)
        print(f"{preset} graphs={graphs} c={c}: {r['tokens_per_s']} tok/s, TTFT p50 {r['ttft_p50_s']} s, "
              f"ITL p50 {r['itl_p50_ms']} ms, GPU busy {r['gpu_busy_pct']} %", flush=True)
    base = out["runs"][0]["tokens_per_s"]
    for r in out["runs"]:
        r["speedup_vs_concurrency_1"] = round(r["tokens_per_s"] / base, 2) if base else None
    inst.release()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,8b", help="comma-separated bench/models.py presets "
                    "(small, 8b, 12b, qwen3-4b, gemma3-4b, 8b-fp8)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--modes", default="graphs,eager", help="graphs, eager or both (comma-separated)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models-dir", default="/tmp/bmodels")
    ap.add_argument("--out", default="bench/results/batching-h100.json")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    from bench.models import PRESETS

    unknown = [p for p in args.presets.split(",") if p not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; choose from {', '.join(sorted(PRESETS))}")
    import torch

    report: dict[str, Any] = {
        "benchmark": "bench/batching", "baseline": "concurrency 1 (one request at a time, the pre-batching engine)",
        "gpu": torch.cuda.get_device_name(0), "host": platform.node(), "torch": torch.__version__,
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "presets": []}
    for p in args.presets.split(","):
        for mode in args.modes.split(","):
            report["presets"].append(bench_preset(p, Path(args.models_dir), args, mode == "graphs"))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
