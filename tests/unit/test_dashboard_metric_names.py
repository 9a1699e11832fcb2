"""The Grafana dashboard (deploy/compose/grafana) plots only series the code exports: every
metric name in every panel's query is one that a real registry or collector of the gateway, the
model server (re-exported by the node), the blobstore, the scheduler or the GPU sampler renders,
with the suffix Prometheus gives its type (``_total``, ``_bucket``, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from modelserver.metrics import ServerMetrics
from services.blobstore.metrics import BlobStats, BlobstoreCollector
from services.gateway.metrics import GatewayMetrics
from snapwake import telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "grafana" / "dashboards" / "snapwake.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
             "summary": ("_count", "_sum", "")}


def _names(families: Any) -> set[str]:
    """The sample names a set of metric families is scraped as."""
    return {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}


def exported() -> set[str]:
    gateway = GatewayMetrics().registry
    model = ServerMetrics(SimpleNamespace(engine=None)).registry
    blob = CollectorRegistry()
    blob.register(BlobstoreCollector(BlobStats(hits=1, misses=1), lambda: (0, 0)))
    # The scheduler's and the GPU sampler's gauges are named in snapwake.telemetry.
    shared = {telemetry.INSTANCES, telemetry.GPU_MEMORY_USED, telemetry.GPU_MEMORY_TOTAL, telemetry.GPU_UTILIZATION}
    return _names(gateway.collect()) | _names(model.collect()) | _names(blob.collect()) | shared


def _exprs() -> dict[str, list[str]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}


def test_every_panel_queries_exported_series() -> None:
    names = exported()
    for title, exprs in _exprs().items():
        for expr in exprs:
            used = set(re.findall(r"\bsnapwake_[a-z0-9_]+", expr))
            assert used and used <= names, (title, sorted(used - names))


def test_the_request_error_token_and_cache_panels() -> None:
    exprs = {title: " ".join(e) for title, e in _exprs().items()}
    assert "rate(snapwake_gateway_requests_total" in exprs["Request rate"]
    errors = _exprs()["Errors, 429 and 503"]
    assert any('status="429"' in e for e in errors) and any('status="503"' in e for e in errors)
    assert any('status=~"4..|5.."' in e for e in errors)
    assert "rate(snapwake_model_generation_tokens_total" in exprs["Tokens per second"]
    hit = exprs["Blobstore cache hit rate"]
    assert "snapwake_blobstore_cache_hits_total" in hit and "snapwake_blobstore_cache_misses_total" in hit


def test_a_misspelt_name_would_be_caught() -> None:
    # The check above is not vacuous: names as a scrape gives them, not the bare family names.
    names = exported()
    assert "snapwake_gateway_requests_total" in names and "snapwake_gateway_requests" not in names
    assert "snapwake_model_ttft_seconds_bucket" in names and "snapwake_blobstore_cache_hits_total" in names
