"""The model server's Prometheus metrics, served at ``GET /metrics`` (its own registry).

Latencies are measured where the answer leaves the engine (each piece is one token, or a few
when a stop string or an incomplete UTF-8 sequence held text back):

    snapwake_model_ttft_seconds                 submission to the first piece
    snapwake_model_inter_token_seconds          between pieces, divided by the tokens they carry
    snapwake_model_prompt_tokens_total          tokens in
    snapwake_model_generation_tokens_total      tokens out
    snapwake_model_requests_total{finish}       finished requests by finish reason ("embedding" for
                                                an embeddings request, whose inputs count as prompt tokens)
    snapwake_model_requests_running             sequences in the running batch (at scrape time)
    snapwake_model_requests_waiting             sequences waiting for KV blocks or a batch slot
    snapwake_model_kv_blocks_used / _total      the KV pool's blocks in use / allocated

The engine keeps no prefix cache (every prompt is prefilled; ``n`` > 1 shares one prefill), so
there are no KV cache hits to count: the cache whose hits decide a start's speed is the node's
snapshot host cache, counted by the blobstore (``snapwake_blobstore_cache_hits_total`` and
``_misses_total``), and plotted beside these on the dashboard (deploy/compose/grafana).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineGauges(Collector):
    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._instance.engine
        load = engine.load() if engine is not None else {}
        for name, doc in (("running", "sequences in the running batch"),
                          ("waiting", "sequences waiting for KV blocks or a batch slot")):
            yield GaugeMetricFamily(f"snapwake_model_requests_{name}", doc, value=load.get(name, 0))
        yield GaugeMetricFamily("snapwake_model_kv_blocks_used", "KV pool blocks in use", value=load.get("kv_used", 0))
        yield GaugeMetricFamily("snapwake_model_kv_blocks_total", "KV pool blocks allocated",
                                value=load.get("kv_total", 0))


class ServerMetrics:
    """One model server's metrics; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, instance: Any) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("snapwake_model_ttft_seconds", "Request submission to its first token",
                              buckets=_LATENCY, registry=self.registry)
        self.inter_token = Histogram("snapwake_model_inter_token_seconds", "Time between output tokens",
                                     buckets=_LATENCY, registry=self.registry)
        self.prompt_tokens = Counter("snapwake_model_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generation_tokens = Counter("snapwake_model_generation_tokens", "Generated tokens", registry=self.registry)
        self.requests = Counter("snapwake_model_requests", "Finished requests", ["finish"], registry=self.registry)
        self.registry.register(_EngineGauges(instance))
