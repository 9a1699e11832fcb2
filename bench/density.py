"""Density and utilisation benchmark: many models on one node under a sporadic, bursty trace.

    python -m bench.density --mode cpu --out bench/results/density-cpu.json
    python -m bench.density --mode gpu --out bench/results/density-h100.json

It starts a local cluster (``snapwake.devcluster``), deploys ``n_models`` functions through the
scheduler's admin API, waits until every one is READY, replays a seeded trace
(``bench.trace``) against the gateway with the real ``openai`` client (streaming), and reports
requests served and errors, CS-TTFT p50/p99, the warm hit rate, the GPU busy fraction (NVML,
GPU mode), standby host memory per model, and what a static one-model-per-GPU deployment would
need for the same trace. The pure part (``classify_status``, ``percentile``, ``summarise``,
``histogram_quantiles``) is unit-tested; the rest (``run`` and below) is I/O.

How a request's claim came about is read from the gateway's ``x-snapwake-claim-source``
response header (``warm`` | ``cold_start`` | ``normal_start``). Where the gateway does not send
it, the cold-start numbers come from the gateway's ``snapwake_cold_start_ttft_seconds``
histogram instead (bucket upper bounds, so coarser), and the JSON says which source was used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import trace as tr

__all__ = ["DensityConfig", "Outcome", "RequestResult", "classify_status", "main", "percentile", "summarise"]

CLAIM_HEADER = "x-snapwake-claim-source"
T = TypeVar("T")

# Sizes beyond bench.models.PRESETS, chosen so a 30+ model mix fits the H100 box's 64 GiB disk
# (each model is written once as safetensors and once as a snapshot): about 1 GB and 8 GB.
EXTRA_PRESETS: dict[str, dict[str, int]] = {
    "1g": dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=12, num_attention_heads=12,
               num_key_value_heads=4, head_dim=128, vocab_size=32000),
    "4b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
}
# Default GPU mix: 34 models, 24 of about 0.4 GB, 8 of about 1 GB, 2 of about 8 GB (33 GB of
# weights; at most about 72 GB of GPU slices if every model were resident at once).
DEFAULT_GPU_MIX = ("small:24", "1g:8", "4b:2")


def _field(default: T, help: str) -> T:
    return field(default=default, metadata={"help": help})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DensityConfig:
    """Snapwake density benchmark: many models on one node under a bursty multi-model trace."""

    mode: str = _field("cpu", "cpu (tiny demo models, CI correctness) or gpu (real sizes, NVML).")
    out: str = _field("", "Where the results JSON goes (default bench/results/density-{cpu,h100}.json).")
    n_models: int = _field(0, "Models in cpu mode (0: 8); gpu mode uses the sum of --gpu-mix.")
    gpu_mix: tuple[str, ...] = _field(DEFAULT_GPU_MIX, "preset:count,... for gpu mode.")
    duration_s: float = _field(30.0, "Length of the trace in seconds.")
    rate: float = _field(2.0, "Mean total request rate (requests per second).")
    burstiness: float = _field(4.0, "On-state rate over mean rate per model (1 = Poisson).")
    zipf_s: float = _field(1.0, "Zipf exponent of model popularity.")
    max_tokens: int = _field(16, "Largest max_tokens of a request (smallest is a quarter of it).")
    seed: int = _field(0, "Trace and model seed.")
    work_dir: str = _field("", "Cluster var dir and models (default: a fresh temp dir).")
    models_dir: str = _field("", "Where the gpu-mode models are written and reused (default: a tmpfs folder, "
                                 "since models plus snapshots of the default mix outgrow a 64 GiB disk).")
    request_timeout_s: float = _field(120.0, "A request with no answer by then counts as lost.")
    ready_timeout_s: float = _field(900.0, "Bound on every function becoming READY.")
    concurrency: int = _field(4, "policy.concurrency of every function.")
    max_instances: int = _field(1, "policy.max_instances of every function.")
    queue_len: int = _field(32, "policy.queue_len of every function.")
    queue_timeout_s: float = _field(30.0, "policy.queue_timeout of every function.")
    idle_timeout_s: float = _field(5.0, "policy.idle_timeout of every function (short: churn).")
    gpu_index: int = _field(0, "GPU sampled with NVML in gpu mode.")
    python_path: str = _field("", "Extra import dirs for containers (carried wheels on the GPU machine).")
    runc: str = _field("runc", "runc binary the nodeagent drives.")

    def validate(self) -> list[str]:
        errs = [] if self.mode in ("cpu", "gpu") else [f"mode must be cpu or gpu, got {self.mode!r}"]
        for name in ("duration_s", "rate", "request_timeout_s", "ready_timeout_s", "queue_timeout_s",
                     "idle_timeout_s"):
            if getattr(self, name) <= 0:
                errs.append(f"{name} must be positive")
        for name in ("concurrency", "max_instances", "queue_len", "max_tokens"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be at least 1")
        if self.burstiness < 1:
            errs.append("burstiness must be at least 1")
        try:
            mix = parse_mix(self.gpu_mix)
            if self.mode == "gpu" and not mix:
                errs.append("gpu_mix must name at least one preset")
        except ValueError as exc:
            errs.append(f"gpu_mix: {exc}")
        return errs

    @property
    def out_path(self) -> Path:
        name = "density-cpu.json" if self.mode == "cpu" else "density-h100.json"
        return Path(self.out) if self.out else Path(__file__).parent / "results" / name


def parse_mix(entries: Sequence[str]) -> list[str]:
    """``("small:24", "4b:2")`` to one preset name per model; raises ``ValueError`` naming the entry."""
    from bench.models import PRESETS

    out: list[str] = []
    for entry in entries:
        preset, sep, count = entry.partition(":")
        if not sep or not count.isdigit() or (preset not in PRESETS and preset not in EXTRA_PRESETS):
            raise ValueError(f"entry {entry!r} must be preset:count with a known preset")
        out += [preset] * int(count)
    return out


class Outcome(enum.Enum):
    """How one request of the trace ended."""

    OK = "ok"  # 200 and a complete stream
    REJECTED = "429"  # the function's queue was full
    UNAVAILABLE = "503"  # no instance in queue_timeout, or a start failed
    ERROR = "error"  # anything else: another status, a broken stream, a malformed 429/503
    LOST = "lost"  # no answer within request_timeout_s


@dataclass(frozen=True)
class RequestResult:
    """What the client saw for one request."""

    model_index: int
    outcome: Outcome
    status: int = 0
    ttft_s: float | None = None
    """Send to first content token, for OK requests."""
    total_s: float | None = None
    claim_source: str = ""
    """The gateway's ``x-snapwake-claim-source`` header; empty if it sent none."""
    detail: str = ""


def classify_status(status: int, headers: dict[str, str], body: object) -> tuple[Outcome, str]:
    """Classifies a non-200 answer; a 429/503 counts only with Retry-After and an OpenAI error
    body (``body`` is the inner ``error`` object, as the ``openai`` client parses it)."""
    if status not in (429, 503):
        return Outcome.ERROR, f"status {status}"
    error = body if isinstance(body, dict) else {}
    problems = []
    if not headers.get("retry-after", "").strip().isdigit():
        problems.append("no numeric Retry-After")
    if not (isinstance(error.get("message"), str) and isinstance(error.get("type"), str)):
        problems.append("no OpenAI error body")
    if problems:
        return Outcome.ERROR, f"malformed {status}: " + ", ".join(problems)
    return (Outcome.REJECTED if status == 429 else Outcome.UNAVAILABLE), str(error.get("code") or "")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(results: Sequence[RequestResult], trace: Sequence[tr.Event], duration_s: float,
              metrics_cold: dict[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark's numbers from the per-request results (pure).

    ``metrics_cold`` (``{"count": n, "p50_s": .., "p99_s": ..}`` from the gateway's histogram)
    is used for the cold-start numbers when no result carries the claim-source header."""
    counts = {o.value: sum(r.outcome is o for r in results) for o in Outcome}
    ok = [r for r in results if r.outcome is Outcome.OK]
    by_header = any(r.claim_source for r in ok)
    cold = [r.ttft_s for r in ok if r.claim_source in ("cold_start", "normal_start") and r.ttft_s is not None]
    out: dict[str, Any] = {"requests": len(results), "served": len(ok), "outcomes": counts,
                           "errors": sum(counts[o.value] for o in (Outcome.ERROR, Outcome.LOST))}
    if by_header or not metrics_cold:
        n_cold = len(cold)
        out.update(cs_ttft_source="header" if by_header else "none", cold_starts=n_cold,
                   cs_ttft_p50_s=percentile(cold, 50), cs_ttft_p99_s=percentile(cold, 99),
                   normal_starts=sum(r.claim_source == "normal_start" for r in ok))
    else:
        n_cold = int(metrics_cold["count"])
        out.update(cs_ttft_source="gateway_metrics", cold_starts=n_cold, cs_ttft_p50_s=metrics_cold["p50_s"],
                   cs_ttft_p99_s=metrics_cold["p99_s"], normal_starts=None)
    out["warm_hit_rate"] = (len(ok) - n_cold) / len(ok) if ok else None
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    out.update(ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99))
    warm_service = [r.total_s for r in ok if r.total_s is not None and r.claim_source in ("", "warm")]
    service_s = percentile(warm_service, 50) or 0.0
    out.update(models_requested=tr.static_gpus_needed(trace), static_gpus_needed=tr.static_gpus_needed(trace),
               static_busy_fraction_per_gpu=tr.static_busy_fraction(trace, duration_s, service_s),
               median_warm_request_s=service_s)
    rejected = [f"{r.status} {r.detail or 'no code'}" for r in results if r.outcome in (Outcome.REJECTED, Outcome.UNAVAILABLE)]
    out["rejections_by_code"] = {k: rejected.count(k) for k in sorted(set(rejected))}
    out["error_samples"] = sorted({r.detail for r in results if r.outcome in (Outcome.ERROR, Outcome.LOST)})[:10]
    return out


# Host memory kinds the nodeagent reports for each instance (Instance.host_{kind}_bytes).
STANDBY_MEMORY = ("rss", "pss", "private")


def standby_memory_report(mem: dict[str, dict[str, int]]) -> dict[str, Any]:
    """``standby_{kind}_bytes`` (per function) with its ``_median`` and ``_max``, for each kind.
    RSS counts the shared libraries (libtorch, CUDA: about 1 GB) in full for every standby; PSS
    shares them out; private is what each standby alone holds."""
    report: dict[str, Any] = {}
    for kind in STANDBY_MEMORY:
        values = sorted(mem.get(kind, {}).values())
        report[f"standby_{kind}_bytes"] = mem.get(kind, {})
        report[f"standby_{kind}_bytes_median"] = percentile(values, 50) if values else None
        report[f"standby_{kind}_bytes_max"] = values[-1] if values else None
    return report


def histogram_quantiles(text: str, name: str) -> dict[str, Any]:
    """Count and bucket-bound p50/p99 of a Prometheus histogram summed over its labels (pure)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0

    def q(p: float) -> float | None:
        if not total:
            return None
        return next(b for b in bounds if buckets[b] >= total * p / 100)

    return {"count": int(total), "p50_s": q(50), "p99_s": q(99)}


def main(argv: Sequence[str] | None = None) -> int:
    from snapwake.config import ConfigError, load

    try:
        config = load(DensityConfig, argv, prog="python -m bench.density")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    report = asyncio.run(run(config))
    print(markdown_table(report))
    print(f"\nresults: {config.out_path}\nservice logs: {report['config']['work_dir']}/var/logs")
    return 0 if report["outcomes"]["lost"] == 0 and report["outcomes"]["error"] == 0 else 1


def markdown_table(report: dict[str, Any]) -> str:
    """The README table of one run."""
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rss, o = report.get("standby_rss_bytes_median"), report["outcomes"]

    def mib(kind: str) -> str:  # median / max
        med, top = report.get(f"standby_{kind}_bytes_median"), report.get(f"standby_{kind}_bytes_max")
        return f"{fmt(med / 2**20 if med else None)} / {fmt(top / 2**20 if top else None)}"

    rows = [("models deployed", report["models"]), ("requests", report["requests"]),
            ("served", report["served"]),
            ("429 / 503 / errors / lost", f"{o['429']} / {o['503']} / {o['error']} / {o['lost']}"),
            ("cold starts", report["cold_starts"]), ("CS-TTFT p50 (s)", fmt(report["cs_ttft_p50_s"])),
            ("CS-TTFT p99 (s)", fmt(report["cs_ttft_p99_s"])), ("warm hit rate", fmt(report["warm_hit_rate"])),
            ("GPU busy fraction", fmt(report["gpu_busy_fraction"])),
            ("standby host RSS per model (MiB, median)", fmt(rss / 2**20 if rss else None)),
            ("standby host PSS per model (MiB, median / max)", mib("pss")),
            ("standby host private per model (MiB, median / max)", mib("private")),
            ("static one-model-per-GPU: GPUs needed", report["static_gpus_needed"]),
            ("static: average busy fraction per GPU", fmt(report["static_busy_fraction_per_gpu"]))]
    return "\n".join(["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def machine() -> dict[str, Any]:
    """What the run ran on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        info["host_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return info


def with_defaults(config: DensityConfig) -> DensityConfig:
    """Fills in the work dir (a fresh temp dir) and cpu-mode model count."""
    # Short on purpose: Unix socket paths under it must stay below 108 bytes.
    work = config.work_dir or tempfile.mkdtemp(prefix="swd-", dir="/tmp")
    return dataclasses.replace(config, work_dir=work, n_models=config.n_models or 8)




# ---------------------------------------------------------------------------------------------
# I/O: models, cluster, admin API, replay, NVML.

_WORDS = ("the quick brown fox jumps over the lazy dog hello world how are you today one two three "
          "four five model weights arena snapshot tokens cache").split()


def _prompt(i: int, e: tr.Event) -> str:
    return " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(e.prompt_len))


def make_models(config: DensityConfig) -> list[tuple[str, Path, int]]:
    """Writes (or reuses) the models; returns (function name, model dir, weight bytes) each."""
    work = Path(config.work_dir)
    if config.mode == "cpu":
        from modelserver.demo import make_demo_model

        return [(f"d{i:02d}-tiny", make_demo_model(work / "models" / f"m{i}", seed=config.seed * 1000 + i), 0)
                for i in range(config.n_models)]
    from bench.models import PRESETS, make_random_llama

    # make_random_llama looks presets up by name; the extra sizes belong to this benchmark only.
    for name, shape in EXTRA_PRESETS.items():
        PRESETS.setdefault(name, shape)
    root = Path(config.models_dir) if config.models_dir else Path("/dev/shm/snapwake-density-models")
    out = []
    for i, preset in enumerate(parse_mix(config.gpu_mix)):
        path = make_random_llama(root / f"m{i}-{preset}", preset, seed=config.seed * 1000 + i)
        size = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        out.append((f"d{i:02d}-{preset}", path, int(size)))
    return out


def function_spec(config: DensityConfig, name: str, model_dir: Path, weight_bytes: int) -> Any:
    """The FunctionSpec of one benchmark model."""
    from snapwake.v1 import types_pb2

    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model_dir))
    p = spec.policy
    p.min_instances, p.max_instances, p.standby_per_node = 0, config.max_instances, 1
    p.concurrency, p.queue_len = config.concurrency, config.queue_len
    p.queue_timeout.FromMilliseconds(int(config.queue_timeout_s * 1000))
    p.idle_timeout.FromMilliseconds(int(config.idle_timeout_s * 1000))
    if config.mode == "gpu":
        # Weights plus a KV pool and workspace of a fifth of them (at least 1 GiB), in 256 MiB steps.
        need = weight_bytes + max(1 << 30, weight_bytes // 5)
        spec.resources.gpu_count = 1
        spec.resources.gpu_memory_bytes = -(-need // (256 << 20)) * (256 << 20)
    return spec


async def deploy(stub: Any, specs: Sequence[Any], timeout_s: float) -> float:
    """Creates every function and waits until all are READY; returns the seconds it took."""
    import grpc

    from snapwake.v1 import scheduler_pb2, types_pb2

    t0 = time.monotonic()
    for spec in specs:
        try:
            await stub.CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise RuntimeError(f"CreateFunction {spec.name}: {exc.code().name}: {exc.details()}") from None
    pending = {f"default/default/{s.name}": "" for s in specs}
    while pending:
        if time.monotonic() - t0 > timeout_s:
            why = "; ".join(f"{fid}: {msg or 'no status'}" for fid, msg in sorted(pending.items())[:3])
            raise TimeoutError(f"{len(pending)} functions not READY after {timeout_s:.0f}s ({why})")
        for fid in sorted(pending):
            got = (await stub.GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=10)).function
            if got.state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"function {fid} FAILED: {got.status_message}")
            if got.state == types_pb2.FUNCTION_STATE_READY:
                del pending[fid]
            else:
                pending[fid] = got.status_message
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


async def standby_memory(stub: Any, fids: Sequence[str], timeout_s: float = 120.0) -> dict[str, dict[str, int]]:
    """Host memory of each function's STANDBY instance, as {"rss"|"pss"|"private": {function:
    bytes}}, waiting (bounded) until each has one with its RSS read. PSS and private are read in
    the same pass as RSS; they stay out (not 0) where the node could not read them."""
    from snapwake.v1 import scheduler_pb2, types_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        got = await stub.ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=10)
        standbys = [i for i in got.instances
                    if i.state == types_pb2.INSTANCE_STATE_STANDBY and i.function_id in fids and i.host_rss_bytes]
        mem = {kind: {i.function_id: getattr(i, f"host_{kind}_bytes") for i in standbys
                      if getattr(i, f"host_{kind}_bytes")} for kind in STANDBY_MEMORY}
        if len(mem["rss"]) == len(fids) or time.monotonic() > deadline:
            return mem
        await asyncio.sleep(1.0)


class GpuSampler:
    """Samples one GPU's utilisation with NVML every ``interval_s`` while running."""

    def __init__(self, index: int, interval_s: float = 0.1) -> None:
        from snapwake.errors import Unavailable

        try:
            import pynvml
        except ImportError as exc:
            raise Unavailable("gpu mode needs NVML: install nvidia-ml-py") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.info = {"gpu_name": pynvml.nvmlDeviceGetName(self._handle),
                         "gpu_memory_bytes": pynvml.nvmlDeviceGetMemoryInfo(self._handle).total,
                         "driver": pynvml.nvmlSystemGetDriverVersion()}
        except pynvml.NVMLError as exc:
            raise Unavailable(f"NVML on GPU {index}: {exc}") from exc
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((time.monotonic(), int(util.gpu), int(mem.used)))
            with contextlib.suppress(TimeoutError):  # the wait is the sampling interval
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def busy_fraction(self) -> float | None:
        return sum(s[1] for s in self.samples) / 100 / len(self.samples) if self.samples else None


async def _request(client: Any, name: str, i: int, e: tr.Event) -> RequestResult:
    sent = time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": _prompt(i, e)}], max_tokens=e.max_tokens,
        temperature=0, stream=True)
    source = raw.headers.get(CLAIM_HEADER, "")
    ttft = None
    async for chunk in raw.parse():
        if ttft is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            ttft = time.monotonic() - sent
    return RequestResult(e.model_index, Outcome.OK, 200, ttft, time.monotonic() - sent, source)


async def _one(client: Any, names: Sequence[str], i: int, e: tr.Event, t0: float, bound_s: float) -> RequestResult:
    import openai

    await asyncio.sleep(max(0.0, t0 + e.t_offset_s - time.monotonic()))
    try:
        return await asyncio.wait_for(_request(client, names[e.model_index], i, e), bound_s)
    except (TimeoutError, openai.APITimeoutError):
        return RequestResult(e.model_index, Outcome.LOST, detail=f"no answer in {bound_s:.0f}s")
    except openai.APIStatusError as exc:
        headers = {k.lower(): v for k, v in exc.response.headers.items()}
        outcome, detail = classify_status(exc.status_code, headers, exc.body)
        return RequestResult(e.model_index, outcome, exc.status_code, detail=detail)
    except openai.APIError as exc:  # connection failures and error events inside the stream
        return RequestResult(e.model_index, Outcome.ERROR, detail=f"{type(exc).__name__}: {exc}"[:200])


async def replay(gateway_url: str, names: Sequence[str], trace: Sequence[tr.Event],
                 bound_s: float) -> list[RequestResult]:
    """Sends every event at its offset (concurrently) and returns the results in trace order."""
    import openai

    async with openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0,
                                  timeout=bound_s) as client:
        t0 = time.monotonic() + 0.2
        return list(await asyncio.gather(*(_one(client, names, i, e, t0, bound_s) for i, e in enumerate(trace))))


async def run(config: DensityConfig) -> dict[str, Any]:
    """The whole benchmark; writes the JSON to ``config.out_path`` and returns the report."""
    import httpx

    from snapwake import telemetry
    from snapwake.devcluster import Cluster, ClusterConfig
    from snapwake.grpcclient import channel
    from snapwake.v1 import scheduler_pb2_grpc

    config = with_defaults(config)
    work = Path(config.work_dir)
    models = await asyncio.to_thread(make_models, config)
    names = [m[0] for m in models]
    lo = max(1, config.max_tokens // 4)
    params = tr.TraceParams(n_models=len(models), duration_s=config.duration_s, rate=config.rate,
                            burstiness=config.burstiness, zipf_s=config.zipf_s, seed=config.seed,
                            max_tokens=(lo, config.max_tokens))
    trace = tr.generate(params)
    sampler = GpuSampler(config.gpu_index) if config.mode == "gpu" else None
    roots = ",".join(sorted({str(m[1].parent) for m in models}))  # the node serves only models below these
    extra: dict[str, list[str]] = {"nodeagent": ["--runc-binary", config.runc, "--start-timeout", "600",
                                                 "--model-roots", roots,
                                                 *(["--python-path", config.python_path] if config.python_path else [])]}
    if config.mode == "gpu":
        total = sum(m[2] for m in models)
        extra["blobstore"] = ["--cache-bytes", str(total + (4 << 30)), "--gpu", "true", "--chunk-bytes", str(256 << 20)]
    cluster = Cluster(ClusterConfig(var_dir=work / "var", gateway_port=0, scheduler_port=0, nodeagent_port=0,
                                    blobstore_port=0, etcd_port=0, extra_args=extra))
    started = time.monotonic()
    # Cluster.start opens etcd's log before it creates logs/ (reported to the lead).
    (work / "var" / "logs").mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(cluster.start)
    try:
        async with channel(cluster.scheduler_address, cluster.client_tls(), server_role="scheduler") as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            deploy_s = await deploy(stub, [function_spec(config, *m) for m in models], config.ready_timeout_s)
            fids = [f"default/default/{n}" for n in names]
            memory = await standby_memory(stub, fids)
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop)) if sampler else None
            t_replay = time.monotonic()
            results = await replay(cluster.gateway_url, names, trace, config.request_timeout_s)
            replay_s = time.monotonic() - t_replay
            stop.set()
            if sampling:
                await sampling
        async with httpx.AsyncClient(timeout=10) as http:
            metrics = (await http.get(cluster.gateway_url + "/metrics")).text
    finally:
        await asyncio.to_thread(cluster.stop)
    report = summarise(results, trace, config.duration_s, histogram_quantiles(metrics, telemetry.COLD_START_TTFT))
    report.update(
        bench="density", mode=config.mode, models=len(models), model_presets=[m[0].split("-", 1)[1] for m in models],
        model_bytes=[m[2] for m in models], machine={**machine(), **(sampler.info if sampler else {})},
        config=dataclasses.asdict(config), trace={**dataclasses.asdict(params), "events": len(trace),
                                                  "per_model": tr.requests_per_model(trace, len(models))},
        gpu_busy_fraction=sampler.busy_fraction() if sampler else None,
        gpu_samples=len(sampler.samples) if sampler else 0,
        gpu_memory_used_max_bytes=max((s[2] for s in sampler.samples), default=None) if sampler else None,
        **standby_memory_report(memory),
        deploy_s=deploy_s, replay_s=replay_s, wall_s=time.monotonic() - started)
    if report["gpu_busy_fraction"] is not None and report["static_gpus_needed"]:
        # The same trace is the same GPU work: spread over one GPU per model, each GPU is busy
        # the measured shared-GPU busy time divided by the number of GPUs. (The service-time
        # estimate above counts queueing under contention as work, so it overstates this.)
        report["static_busy_fraction_per_gpu_service_time_estimate"] = report["static_busy_fraction_per_gpu"]
        report["static_busy_fraction_per_gpu"] = report["gpu_busy_fraction"] / report["static_gpus_needed"]
    out = config.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
