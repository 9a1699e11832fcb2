"""deploy/compose: the compose file validates, and the dashboards use the shared metric names."""

from __future__ import annotations

import json
import os
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


def _doc() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


# The observability images are public and cannot be pulled here: that profile is checked by
# `docker-compose config` only (the others also run, tests/integration/test_compose_cluster.py).
@pytest.mark.parametrize("profiles", [[], ["cpu"], ["gpu"], ["cpu", "observability"]])
def test_compose_file_validates(profiles: list[str]) -> None:
    argv = [_compose(), "-f", str(COMPOSE / "docker-compose.yml")]
    for profile in profiles:
        argv += ["--profile", profile]
    done = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SNAPWAKE_API_KEY": "sk-test"})
    assert done.returncode == 0, done.stderr


def test_compose_file_requires_an_api_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SNAPWAKE_API_KEY"}
    done = subprocess.run([_compose(), "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0 and "SNAPWAKE_API_KEY" in done.stderr


def test_profiles_split_the_node_services() -> None:
    # Debian's docker-compose 1.29 lists every service whatever the profile, so read the file.
    profiles = {name: set(svc.get("profiles", ())) for name, svc in _doc()["services"].items()}
    assert {n for n, p in profiles.items() if "cpu" in p} == {
        "nodeagent-1", "blobstore-1", "nodeagent-2", "blobstore-2"}
    assert {n for n, p in profiles.items() if "gpu" in p} == {
        "nodeagent-1-gpu", "blobstore-1-gpu", "nodeagent-2", "blobstore-2"}
    assert {n for n, p in profiles.items() if p == {"observability"}} == {
        "otel-collector", "tempo", "prometheus", "grafana"}
    always = {n for n, p in profiles.items() if not p}
    assert always == {"etcd", "etcd-auth", "scheduler", "gateway", "node-1", "node-2", "deploy-demo"}


def test_gpu_services_reserve_nvidia_devices() -> None:
    services = _doc()["services"]
    for name in ("nodeagent-1-gpu", "blobstore-1-gpu"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["nodeagent-2"]


def test_nodeagents_get_named_capabilities_not_privileged() -> None:
    services = _doc()["services"]
    for name in ("nodeagent-1", "nodeagent-1-gpu", "nodeagent-2"):
        svc = services[name]
        assert "privileged" not in svc, name
        assert svc["cap_drop"] == ["ALL"] and "SYS_ADMIN" in svc["cap_add"], name
        assert "/sys/fs/cgroup:/sys/fs/cgroup:rw" in svc["volumes"], name
    assert not any("cgroup" in v for v in services["blobstore-1"]["volumes"])


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


def test_the_admin_api_requires_a_token_and_the_gateway_holds_a_registered_one() -> None:
    services = _doc()["services"]
    scheduler, gateway = services["scheduler"]["environment"], services["gateway"]["environment"]
    assert scheduler["SNAPWAKE_ADMIN_AUTH"] == "true"
    assert gateway["SNAPWAKE_ADMIN_TOKEN_FILE"] in scheduler["SNAPWAKE_ADMIN_TOKEN_FILES"].split(",")
    assert services["deploy-demo"]["environment"]["SNAPWAKE_TOKEN_FILE"] in scheduler["SNAPWAKE_ADMIN_TOKEN_FILES"].split(",")
    # The gateway mounts its own folder only, not the operator's token.
    assert not any("/operator" in v for v in services["gateway"]["volumes"])
