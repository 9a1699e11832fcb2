"""snapwake.telemetry: exporter choice, the traced helper, the GPU collector, /metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, StatusCode
from prometheus_client import CollectorRegistry

from snapwake import telemetry
from snapwake.telemetry import GpuReading, TracingMode
from snapwake.testing import free_port


@pytest.mark.parametrize("env, mode", [
    ({}, TracingMode.NONE),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"}, TracingMode.OTLP),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4317"}, TracingMode.OTLP),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, TracingMode.OTLP),
    ({"OTEL_TRACES_EXPORTER": "console"}, TracingMode.CONSOLE),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, TracingMode.NONE),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, TracingMode.NONE),
])
def test_tracing_mode(env: dict[str, str], mode: TracingMode) -> None:
    assert telemetry.tracing_mode(env) is mode


def test_unknown_exporter_is_named() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER: unsupported exporter 'zipkin'"):
        telemetry.tracing_mode({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_no_exporter_configured_gives_noop_provider() -> None:
    assert isinstance(telemetry.build_tracer_provider("svc", TracingMode.NONE), NoOpTracerProvider)


def test_otlp_provider_builds_without_collector() -> None:
    provider = telemetry.build_tracer_provider("svc", TracingMode.OTLP)
    assert provider.resource.attributes["service.name"] == "svc"  # type: ignore[attr-defined]
    provider.shutdown()  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> tuple[object, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return telemetry.build_tracer_provider("test", TracingMode.NONE, exporter=exporter), exporter


async def test_traced_decorator_nests_and_records_errors(spans: tuple) -> None:
    provider, exporter = spans

    @telemetry.traced("inner", provider=provider)
    async def inner(x: int) -> int:
        await asyncio.sleep(0)
        if x < 0:
            raise ValueError("negative")
        return x * 2

    @telemetry.traced("outer", provider=provider, attributes={"function": "t/d/m"})
    async def outer(x: int) -> int:
        return await inner(x)

    assert await outer(21) == 42
    with pytest.raises(ValueError):
        await inner(-1)
    provider.force_flush()
    done = {s.name + str(i): s for i, s in enumerate(exporter.get_finished_spans())}
    inner_ok, outer_span, inner_bad = done["inner0"], done["outer1"], done["inner2"]
    assert inner_ok.parent.span_id == outer_span.context.span_id
    assert outer_span.attributes["function"] == "t/d/m"
    assert inner_bad.status.status_code is StatusCode.ERROR
    assert inner_bad.events[0].name == "exception"


async def test_traced_as_async_context(spans: tuple) -> None:
    provider, exporter = spans
    async with telemetry.traced("block", provider=provider) as span:
        span.set_attribute("bytes", 7)
    provider.force_flush()
    (only,) = exporter.get_finished_spans()
    assert (only.name, only.attributes["bytes"]) == ("block", 7)


class _Reader:
    def __init__(self, readings: list[GpuReading]) -> None:
        self.readings = readings

    def read(self) -> list[GpuReading]:
        return self.readings


def _samples(collector: telemetry.GpuCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(s.name, s.labels["gpu"]): s.value for m in registry.collect() for s in m.samples}


def test_gpu_collector_exports_each_gpu() -> None:
    reader = _Reader([GpuReading(0, "GPU-a", 5 << 30, 80 << 30, 0.25),
                      GpuReading(1, "GPU-b", 0, 80 << 30, 0.0)])
    got = _samples(telemetry.gpu_metrics_collector(reader))
    assert got[(telemetry.GPU_MEMORY_USED, "0")] == 5 << 30
    assert got[(telemetry.GPU_MEMORY_TOTAL, "1")] == 80 << 30
    assert got[(telemetry.GPU_UTILIZATION, "0")] == 0.25
    assert len(got) == 6


def test_gpu_collector_without_nvml_exports_nothing() -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    except pynvml.NVMLError:
        pass
    assert _samples(telemetry.gpu_metrics_collector()) == {}


def test_metrics_server_serves_registered_names() -> None:
    from prometheus_client import Histogram

    hist = Histogram(telemetry.COLD_START_TTFT, "test", ["function"], buckets=telemetry.LATENCY_BUCKETS)
    try:
        hist.labels("t/d/m").observe(0.3)
        port = free_port()
        telemetry.start_metrics_server(port, addr="127.0.0.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert f'{telemetry.COLD_START_TTFT}_bucket{{function="t/d/m",le="0.3"}} 1.0' in body
    finally:
        from prometheus_client import REGISTRY

        REGISTRY.unregister(hist)


@pytest.mark.gpu
def test_nvml_reader_reads_each_real_gpu() -> None:
    import pynvml

    readings = telemetry.NvmlReader().read()
    pynvml.nvmlInit()
    assert len(readings) == pynvml.nvmlDeviceGetCount() > 0
    for r in readings:
        assert 0 < r.memory_used_bytes <= r.memory_total_bytes and 0.0 <= r.utilization_ratio <= 1.0
    assert len(_samples(telemetry.gpu_metrics_collector())) == 3 * len(readings)


def test_traceparent_round_trips_through_a_socket_message() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    assert telemetry.traceparent() == {}  # nothing traced: the message carries nothing
    assert telemetry.parent_context({"op": "load"}) is None
    assert telemetry.parent_context({"traceparent": 7}) is None
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("sender") as span:
        msg = {"op": "load", **telemetry.traceparent()}
    context = span.get_span_context()
    assert msg["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    with tracer.start_as_current_span("receiver", context=telemetry.parent_context(msg)) as child:
        assert child.get_span_context().trace_id == context.trace_id
        assert child.parent is not None and child.parent.span_id == context.span_id
