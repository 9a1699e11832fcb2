"""Prometheus metrics of one gateway, in their own registry (several apps can live in one test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from snapwake import telemetry

__all__ = ["GatewayMetrics"]

# The histogram names are shared with the Grafana dashboard (snapwake.telemetry).
_BUCKETS = (0.001, 0.005, *telemetry.LATENCY_BUCKETS, 120.0)


class GatewayMetrics:
    """Requests, queue wait, queue depth and the cold-start time to first token (CS-TTFT)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("snapwake_gateway_requests", "Requests answered, by function and HTTP status.",
                                ["function", "status"], registry=self.registry)
        self.queue_wait = Histogram(telemetry.QUEUE_WAIT,
                                    "Time from enqueue to claim (or to giving up).", ["function"],
                                    buckets=_BUCKETS, registry=self.registry)
        self.cs_ttft = Histogram(telemetry.COLD_START_TTFT,
                                 "Request arrival to first byte, for requests that waited for a start.",
                                 ["function", "source"], buckets=_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("snapwake_gateway_queue_depth", "Requests waiting for a claim.",
                                 ["function"], registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
