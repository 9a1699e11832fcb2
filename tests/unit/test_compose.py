"""deploy/compose: the compose file validates, and the dashboards use the shared metric names."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from snapwake import telemetry

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"


def _compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found: run 'make install' (Debian package docker-compose)")
    return binary


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_file_validates(profile: str | None) -> None:
    argv = [_compose(), "-f", str(COMPOSE / "docker-compose.yml")]
    argv += ["--profile", profile] if profile else []
    done = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_profiles_split_the_node_services() -> None:
    # Debian's docker-compose 1.29 lists every service whatever the profile, so read the file.
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    profiles = {name: tuple(svc.get("profiles", ())) for name, svc in services.items()}
    assert {n for n, p in profiles.items() if p == ("cpu",)} == {"nodeagent-cpu", "blobstore-cpu"}
    assert {n for n, p in profiles.items() if p == ("gpu",)} == {"nodeagent-gpu", "blobstore-gpu"}
    always = {n for n, p in profiles.items() if not p}
    assert {"etcd", "scheduler", "gateway", "otel-collector", "tempo", "prometheus", "grafana"} <= always


def test_gpu_services_reserve_nvidia_devices() -> None:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    for name in ("nodeagent-gpu", "blobstore-gpu"):
        (device,) = doc["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert doc["services"]["nodeagent-gpu"]["privileged"] is True


def test_grafana_dashboard_plots_the_shared_metric_names() -> None:
    dash = json.loads((COMPOSE / "grafana" / "dashboards" / "snapwake.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in (telemetry.COLD_START_TTFT, telemetry.QUEUE_WAIT, telemetry.INSTANCES,
                 telemetry.GPU_MEMORY_USED, telemetry.GPU_UTILIZATION):
        assert name in exprs, name
    assert f"histogram_quantile(0.99, sum by (le, function) (rate({telemetry.COLD_START_TTFT}_bucket" in exprs


def test_grafana_provisions_both_datasources_the_dashboard_uses() -> None:
    sources = yaml.safe_load((COMPOSE / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text())
    uids = {d["uid"]: d["type"] for d in sources["datasources"]}
    assert uids == {"prometheus": "prometheus", "tempo": "tempo"}
    dash = json.loads((COMPOSE / "grafana" / "dashboards" / "snapwake.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} <= set(uids)


def test_prometheus_scrapes_every_service() -> None:
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in scrape["scrape_configs"]}
    assert {"gateway", "scheduler", "nodeagent", "blobstore"} <= jobs
