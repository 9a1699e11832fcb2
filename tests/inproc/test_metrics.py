"""Prometheus /metrics of the scheduler, nodeagent and blobstore: each series exists, with real
numbers behind it, and the GPU series are absent on a host without a GPU (never faked)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from modelserver import handover
from services.blobstore import metrics as bm
from services.blobstore.testing import put_snapshot, running_blobstore
from services.scheduler.metrics import InstancesCollector, count_instances
from services.scheduler.state import ClusterState, intent_of
from snapwake import keys, telemetry
from snapwake.etcd import Etcd
from snapwake.testing import EtcdProcess, free_port, wait_for
from snapwake.v1 import types_pb2
from snapwake.v1.types_pb2 import InstanceState

ROOT = Path(__file__).resolve().parents[2]
GPU_SERIES = {telemetry.GPU_MEMORY_USED, telemetry.GPU_MEMORY_TOTAL, telemetry.GPU_UTILIZATION}


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted labels -> value} from ``GET /metrics`` on ``port``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def families(port: int) -> set[str]:
    """Family names as exposed, counters included (the parser strips their _total)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The default registry served the way each service's main serves it."""
    port = free_port()
    telemetry.start_metrics_server(port, addr="127.0.0.1")
    return port


@pytest.mark.parametrize("states, expected", [
    ([], {}),
    ([("a/b/c", InstanceState.INSTANCE_STATE_RUNNING)], {("a/b/c", "RUNNING"): 1}),
    ([("a/b/c", InstanceState.INSTANCE_STATE_STANDBY), ("a/b/c", InstanceState.INSTANCE_STATE_STANDBY), ("a/b/d", InstanceState.INSTANCE_STATE_IDLE)],
     {("a/b/c", "STANDBY"): 2, ("a/b/d", "IDLE"): 1}),
])
def test_count_instances(states: list[tuple[str, int]], expected: dict[tuple[str, str], int]) -> None:
    insts = [types_pb2.Instance(id=f"i-{k:012x}", function_id=f, state=s) for k, (f, s) in enumerate(states)]
    assert count_instances(insts) == expected


@pytest.mark.parametrize("lookups, ratio", [([], None), ([True], 1.0), ([True, False, False, True], 0.5)])
def test_hit_ratio(lookups: list[bool], ratio: float | None) -> None:
    stats = bm.BlobStats()
    for hit in lookups:
        stats.lookup(hit)
    assert stats.hit_ratio() == ratio


async def test_scheduler_instances_gauge_follows_etcd(etcd_server: EtcdProcess, metrics_port: int) -> None:
    fid = f"metrics/t{secrets.token_hex(3)}/fn"
    iids = [f"i-{secrets.token_hex(6)}" for _ in range(3)]
    async with Etcd.connect(etcd_server.address) as store:
        state = ClusterState(store)
        await state.start()
        collector = InstancesCollector(state)
        REGISTRY.register(collector)
        try:
            for iid, st in zip(iids, (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_STANDBY, InstanceState.INSTANCE_STATE_STANDBY),
                               strict=True):
                inst = types_pb2.Instance(id=iid, node="node-m", function_id=fid, state=st)
                await store.put(keys.intent_key(iid), intent_of(inst))  # as if the scheduler had started it
                await store.put(keys.instance_key("node-m", iid), inst)
            want = {(("function", fid), ("state", "RUNNING")): 1.0, (("function", fid), ("state", "STANDBY")): 2.0}

            async def shown() -> dict[tuple[tuple[str, str], ...], float]:
                got = (await asyncio.to_thread(scrape, metrics_port)).get(telemetry.INSTANCES, {})
                return {k: v for k, v in got.items() if ("function", fid) in k}

            # The watch applies the puts asynchronously: poll the scrape, bounded.
            for _ in range(100):
                if await shown() == want:
                    break
                await asyncio.sleep(0.1)
            assert await shown() == want
        finally:
            REGISTRY.unregister(collector)
            for iid in iids:
                await store.delete(keys.instance_key("node-m", iid))
            await state.stop()


async def test_blobstore_cache_and_dma_series(tmp_path: Path, metrics_port: int) -> None:
    sid, data = "metrics/default/blob@1", os.urandom(300_000)
    async with running_blobstore(tmp_path, cache_bytes=4 << 20) as app:
        collector = app.collector()
        REGISTRY.register(collector)
        try:
            await put_snapshot(app.address, sid, data, chunk_bytes=64 << 10)
            before = scrape(metrics_port)
            lookups0 = before[bm.CACHE_HITS][()] + before[bm.CACHE_MISSES][()]
            assert before[bm.CACHE_BYTES_BUDGET][()] == 4 << 20
            for _ in range(2):  # what a model server's attach does: load, map (here: close), ack
                await asyncio.to_thread(handover.load, app.cfg.handover_socket, sid, -1,
                                        lambda fd, reply: os.close(fd), 30.0)
            after = scrape(metrics_port)
        finally:
            REGISTRY.unregister(collector)
    assert after[bm.DMA_BYTES][()] - before[bm.DMA_BYTES][()] == 2 * len(data)
    assert after[bm.DMA_SECONDS][()] > before[bm.DMA_SECONDS][()]
    assert after[bm.CACHE_HITS][()] + after[bm.CACHE_MISSES][()] - lookups0 == 2
    assert after[bm.CACHE_HITS][()] >= 1  # the second load at least found it cached
    assert after[bm.CACHE_BYTES_USED][()] >= len(data)
    assert 0.0 < after[bm.CACHE_HIT_RATIO][()] <= 1.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="swm", dir="/tmp"))  # Unix socket paths stay short
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _service_args(name: str, etcd: str, d: Path) -> list[str]:
    return {
        "scheduler": ["--listen", f"127.0.0.1:{free_port()}", "--etcd", etcd, "--etcd-plaintext", "true",
                      "--dev-plaintext"],
        "blobstore": ["--listen", f"127.0.0.1:{free_port()}", "--dirs", str(d / "b0"),
                      "--handover-socket", str(d / "h.sock"), "--gpu", "false", "--cache-bytes", str(1 << 20),
                      "--dev-plaintext"],
        "nodeagent": ["--name", f"metrics-{secrets.token_hex(3)}", "--listen", f"127.0.0.1:{free_port()}",
                      "--etcd", etcd, "--containers", "fake", "--gpus", "none", "--state-dir", str(d / "na"),
                      "--handover-socket", str(d / "h.sock"), "--etcd-plaintext", "true", "--dev-plaintext"],
    }[name]


@pytest.mark.parametrize("name, expected", [
    ("scheduler", {telemetry.INSTANCES}),
    ("blobstore", {bm.CACHE_BYTES_USED, bm.CACHE_BYTES_BUDGET, bm.CACHE_HITS + "_total",
                   bm.CACHE_MISSES + "_total", bm.DMA_BYTES + "_total", bm.DMA_SECONDS + "_total"}),
    # Its own: the GPU ones (none here) and the cold-standby tier's gauge.
    ("nodeagent", {"process_cpu_seconds_total", "snapwake_nodeagent_cold_standbys"}),
])
def test_service_main_serves_metrics_on_metrics_port(name: str, expected: set[str], etcd_server: EtcdProcess,
                                                       short_dir: Path) -> None:
    port = free_port()
    log = short_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}",
                                 *_service_args(name, etcd_server.address, short_dir)],
                                env={**os.environ, "SNAPWAKE_METRICS_PORT": str(port)}, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                return expected <= families(port)  # the nodeagent's own come once its agent runs
            except httpx.HTTPError:
                return False

        wait_for(up, 30, f"{name} /metrics on {port}", interval=0.2)
        names = families(port)
        assert expected <= names, f"missing: {expected - names}"
        assert not GPU_SERIES & names, "GPU series on a host without a GPU"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
