"""The density benchmark's CPU version as a correctness test: a real cluster (etcd, the four
services, runc containers), several tiny models, a seeded bursty trace replayed with the real
``openai`` client. Every request must be answered 200, or get a well-formed 429/503."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.density import DensityConfig, markdown_table, run

pytestmark = pytest.mark.integration

FIELDS = {
    "requests", "served", "outcomes", "errors", "cold_starts", "cs_ttft_source", "cs_ttft_p50_s",
    "cs_ttft_p99_s", "warm_hit_rate", "ttft_p50_s", "ttft_p99_s", "static_gpus_needed",
    "static_busy_fraction_per_gpu", "rejections_by_code", "gpu_busy_fraction", "standby_rss_bytes", "standby_rss_bytes_median",
    "standby_pss_bytes_median", "standby_pss_bytes_max", "standby_private_bytes_median", "standby_private_bytes_max",
    "machine", "config", "trace", "models", "deploy_s", "replay_s", "wall_s",
}


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """pytest's tmp_path is too long for the Unix sockets the nodeagent makes under it; the
    service logs are copied into tmp_path afterwards so a failure can be read."""
    path = Path(tempfile.mkdtemp(prefix="swd-", dir="/tmp"))
    yield path
    if (path / "var" / "logs").is_dir():
        shutil.copytree(path / "var" / "logs", tmp_path / "logs", dirs_exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_density_cpu_trace_is_answered_correctly(tmp_path: Path, short_dir: Path) -> None:
    out = tmp_path / "density-cpu.json"
    config = DensityConfig(mode="cpu", out=str(out), n_models=8, duration_s=20.0, rate=1.5, burstiness=3.0,
                           max_tokens=8, seed=1, work_dir=str(short_dir), request_timeout_s=60.0,
                           ready_timeout_s=400.0, idle_timeout_s=3.0, queue_timeout_s=20.0)
    report = asyncio.run(run(config))
    print(markdown_table(report))

    outcomes = report["outcomes"]
    # Every request got an answer: 200, or a 429/503 with Retry-After and an OpenAI error body
    # (a malformed one counts as "error").
    why = {"errors": report["error_samples"], "rejections": report["rejections_by_code"]}
    assert outcomes["lost"] == 0, why
    assert outcomes["error"] == 0, why
    assert outcomes["ok"] + outcomes["429"] + outcomes["503"] == report["requests"] == report["trace"]["events"]
    assert report["served"] > 0, why
    assert report["cold_starts"] >= 1 and report["cs_ttft_p99_s"] is not None
    assert 0 <= report["warm_hit_rate"] <= 1
    assert report["gpu_busy_fraction"] is None  # no GPU in cpu mode
    assert report["static_gpus_needed"] == sum(1 for n in report["trace"]["per_model"] if n)

    written = json.loads(out.read_text())
    assert FIELDS <= written.keys()
    assert written["outcomes"] == outcomes
