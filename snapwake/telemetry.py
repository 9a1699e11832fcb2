"""Tracing and metrics set-up shared by every service, and the metric names they all use.

Tracing is configured by the standard ``OTEL_*`` variables, which the OpenTelemetry SDK reads
itself (endpoint, headers, sampler, resource attributes). ``setup_tracing`` only decides
*whether* to export: without an OTLP endpoint or an explicit ``OTEL_TRACES_EXPORTER`` the
process keeps the no-op provider, so nothing buffers spans for a collector that isn't there.

The Unix-socket protocols (``snapwake.protocols``) carry the W3C ``traceparent`` as an optional
JSON field: senders add ``traceparent()``, receivers start their span in ``parent_context(msg)``.

Metric names live here as constants so the services, the Grafana dashboard and the tests agree.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import NoOpTracerProvider, Span, TracerProvider
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "COLD_START_TTFT", "GPU_MEMORY_TOTAL", "GPU_MEMORY_USED", "GPU_UTILIZATION", "INSTANCES",
    "LATENCY_BUCKETS", "QUEUE_WAIT", "GpuCollector", "GpuReading", "NvmlReader", "TracingMode",
    "build_tracer_provider", "gpu_metrics_collector", "parent_context", "setup_tracing",
    "start_metrics_server", "traced", "traceparent", "tracing_mode",
]

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# Histogram, seconds from the cold-start decision to the first token; labels: function.
COLD_START_TTFT = "snapwake_cold_start_ttft_seconds"
# Histogram, seconds a request waited in the gateway's queue; labels: function.
QUEUE_WAIT = "snapwake_queue_wait_seconds"
# Gauge, instances per state; labels: function, state (InstanceState name without prefix).
INSTANCES = "snapwake_instances"
# Gauges per GPU; labels: gpu (index), uuid.
GPU_MEMORY_USED = "snapwake_gpu_memory_used_bytes"
GPU_MEMORY_TOTAL = "snapwake_gpu_memory_total_bytes"
GPU_UTILIZATION = "snapwake_gpu_utilization_ratio"
# Buckets fine enough around the sub-second cold-start target for useful p50/p99.
LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                      1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class TracingMode(enum.Enum):
    """What ``setup_tracing`` installs."""

    NONE = "none"  # the no-op provider: spans are not recorded
    OTLP = "otlp"  # BatchSpanProcessor over the OTLP gRPC exporter
    CONSOLE = "console"  # spans printed to stdout, for debugging a single process


def tracing_mode(env: Mapping[str, str]) -> TracingMode:
    """Chooses the exporter from the standard variables; raises ``ValueError`` naming a bad one."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return TracingMode.NONE
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return TracingMode.OTLP if endpoint else TracingMode.NONE
    try:
        return TracingMode(names[0])
    except ValueError:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {names[0]!r} "
                         f"(expected otlp, console or none)") from None


def build_tracer_provider(service_name: str, mode: TracingMode, exporter: Any = None) -> TracerProvider:
    """A provider for ``mode``; ``exporter`` replaces the OTLP one (tests pass an in-memory one)."""
    if mode is TracingMode.NONE and exporter is None:
        return NoOpTracerProvider()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter is None and mode is TracingMode.OTLP:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, TLS: read by the SDK from OTEL_*
    elif exporter is None:
        exporter = ConsoleSpanExporter()
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
    provider = SdkTracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> None:
    """Installs the global tracer provider once; call it from a service's ``main()``."""
    mode = tracing_mode(os.environ if env is None else env)
    trace.set_tracer_provider(build_tracer_provider(service_name, mode))
    log.info("tracing: %s", mode.value)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serves ``/metrics`` for the default registry on ``port`` from a daemon thread."""
    start_http_server(port, addr=addr)


class traced(AbstractContextManager[Span], AbstractAsyncContextManager[Span]):  # noqa: N801
    """A span around an async function (as a decorator) or a block (``with``/``async with``).

    Exceptions are recorded on the span and mark it as an error, then propagate.
    """

    def __init__(self, span_name: str, *, provider: TracerProvider | None = None,
                 attributes: Mapping[str, Any] | None = None) -> None:
        self.span_name = span_name
        self.provider = provider
        self.attributes = dict(attributes or {})
        self._stack: list[AbstractContextManager[Span]] = []

    def _tracer(self) -> trace.Tracer:
        return trace.get_tracer("snapwake", tracer_provider=self.provider)

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._tracer().start_as_current_span(self.span_name, attributes=self.attributes):
                return await fn(*args, **kwargs)

        return wrapper

    def __enter__(self) -> Span:
        cm = self._tracer().start_as_current_span(self.span_name, attributes=self.attributes)
        self._stack.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.pop().__exit__(*exc)

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        return self.__exit__(*exc)


def traceparent() -> dict[str, str]:
    """The current span as ``{"traceparent": ...}`` for a socket message (``{}`` when nothing is
    traced), so the receiver's spans join the sender's trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {"traceparent": carrier["traceparent"]} if "traceparent" in carrier else {}


def parent_context(msg: Mapping[str, Any]) -> Context | None:
    """The trace context a message's ``traceparent`` field continues; None when it has none."""
    parent = msg.get("traceparent")
    return propagate.extract({"traceparent": parent}) if isinstance(parent, str) else None


@dataclass(frozen=True)
class GpuReading:
    """One GPU's numbers at scrape time."""

    index: int
    uuid: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: float


class GpuReader(Protocol):
    def read(self) -> Sequence[GpuReading]:
        """Current readings; empty when no GPU can be read."""


class NvmlReader:
    """Reads GPUs through NVML; reads nothing (and says so once) when NVML is unavailable."""

    def __init__(self) -> None:
        self._ready = False
        self._warned = False

    def _init(self) -> bool:
        import pynvml

        if not self._ready:
            try:
                pynvml.nvmlInit()
                self._ready = True
            except pynvml.NVMLError as exc:
                if not self._warned:
                    log.info("GPU metrics off: NVML unavailable (%s)", exc)
                    self._warned = True
        return self._ready

    def read(self) -> list[GpuReading]:
        if not self._init():
            return []
        import pynvml

        try:
            return [self._one(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as exc:  # a GPU fell off the bus: report nothing rather than guess
            log.warning("GPU metrics: NVML read failed: %s", exc)
            return []

    @staticmethod
    def _one(pynvml: Any, index: int) -> GpuReading:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        return GpuReading(index, uuid if isinstance(uuid, str) else uuid.decode(), int(mem.used),
                          int(mem.total), util.gpu / 100.0)


class GpuCollector(Collector):
    """Per-GPU memory and utilisation gauges; no families at all when nothing can be read."""

    def __init__(self, reader: GpuReader) -> None:
        self.reader = reader

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # read only at scrape time: registering must not touch NVML

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = self.reader.read()
        if not readings:
            return
        labels = ["gpu", "uuid"]
        used = GaugeMetricFamily(GPU_MEMORY_USED, "GPU memory in use (NVML).", labels=labels)
        total = GaugeMetricFamily(GPU_MEMORY_TOTAL, "GPU memory in total (NVML).", labels=labels)
        util = GaugeMetricFamily(GPU_UTILIZATION, "GPU busy time ratio over NVML's last sample "
                                 "period.", labels=labels)
        for r in readings:
            key = [str(r.index), r.uuid]
            used.add_metric(key, r.memory_used_bytes)
            total.add_metric(key, r.memory_total_bytes)
            util.add_metric(key, r.utilization_ratio)
        yield from (used, total, util)


def gpu_metrics_collector(reader: GpuReader | None = None) -> GpuCollector:
    """The GPU collector over NVML; register it with ``prometheus_client.REGISTRY.register``."""
    return GpuCollector(reader or NvmlReader())
