"""One trace per request across every process: the real services export over OTLP to a small
receiver built from the opentelemetry-proto service definitions, and a cold-start request's
spans must form one tree rooted at the gateway's server span."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from snapwake.devcluster import Cluster, ClusterConfig, deploy_demo
from snapwake.testing import free_port
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

pytestmark = pytest.mark.integration

SERVICES = ("gateway", "scheduler", "nodeagent", "blobstore", "modelserver")


@dataclass(frozen=True)
class Got:
    """One received span with the service that sent it."""

    service: str
    span: trace_pb2.Span


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Got] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                service = attrs.get("service.name", "")
                self.spans.extend(Got(service, s) for ss in rs.scope_spans for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_trace(self) -> dict[bytes, list[Got]]:
        with self.lock:
            out: dict[bytes, list[Got]] = {}
            for g in self.spans:
                out.setdefault(g.span.trace_id, []).append(g)
            return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    yield servicer, port
    server.stop(1)


@pytest.fixture(scope="module")
def cluster(receiver: tuple[Receiver, int], demo_model_dir: Path) -> Iterator[Cluster]:
    # Short path: the Unix sockets under it must stay below 108 bytes.
    var = Path(tempfile.mkdtemp(prefix="swtr", dir="/tmp"))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0,
                           blobstore_port=0, etcd_port=0, extra_env=env)
    try:
        with Cluster(config) as c:
            asyncio.run(deploy_demo(c.scheduler_address, demo_model_dir, timeout=240, tls=c.client_tls()))
            yield c
    finally:
        shutil.rmtree(var, ignore_errors=True)


def _wait_standby(cluster: Cluster, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with cluster.admin_channel() as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        while time.monotonic() < deadline:
            got = stub.ListInstances(scheduler_pb2.ListInstancesRequest(function_id="default/default/demo"),
                                     timeout=10)
            states = [i.state for i in got.instances]
            if types_pb2.INSTANCE_STATE_STANDBY in states and not any(
                    s in (types_pb2.INSTANCE_STATE_RUNNING, types_pb2.INSTANCE_STATE_IDLE) for s in states):
                return
            time.sleep(0.5)
    raise TimeoutError(f"no standby (and nothing running) for demo after {timeout:.0f}s")


def _service(name: str) -> str:
    return name.removeprefix("snapwake-")


def _complete(spans: list[Got]) -> bool:
    names = {g.span.name for g in spans}
    return {_service(g.service) for g in spans} >= set(SERVICES) and \
        {"queue.wait", "claim", "restore", "dma", "first_token", "generate", "attach"} <= names


def _ancestors(span: trace_pb2.Span, by_id: dict[bytes, Got]) -> list[str]:
    out, parent = [], span.parent_span_id
    while parent in by_id:
        got = by_id[parent]
        out.append(f"{_service(got.service)}:{got.span.name}")
        parent = got.span.parent_span_id
    return out


def test_cold_start_request_is_one_trace_across_every_process(cluster: Cluster,
                                                              receiver: tuple[Receiver, int]) -> None:
    _wait_standby(cluster)
    body = {"model": "demo", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4,
            "stream": True}
    with httpx.stream("POST", cluster.gateway_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-snapwake-claim-source"] == "cold_start"
        assert b"[DONE]" in r.read()

    deadline, trace = time.monotonic() + 30, None
    while trace is None and time.monotonic() < deadline:
        trace = next((s for s in receiver[0].by_trace().values()
                      if any(g.span.name == "first_token" for g in s) and _complete(s)), None)
        time.sleep(0.3)
    seen = {_service(g.service) + ":" + g.span.name for s in receiver[0].by_trace().values() for g in s}
    assert trace is not None, f"no trace with every service and span; spans seen: {sorted(seen)}"

    by_id = {g.span.span_id: g for g in trace}
    roots = [g for g in trace if g.span.parent_span_id not in by_id]
    assert len(roots) == 1, f"not one tree: roots {[(r.service, r.span.name) for r in roots]}"
    root = roots[0]
    assert _service(root.service) == "gateway" and not root.span.parent_span_id
    assert root.span.kind == trace_pb2.Span.SPAN_KIND_SERVER

    def one(service: str, name: str) -> Got:
        found = [g for g in trace if _service(g.service) == service and g.span.name == name]
        assert found, f"no {service}:{name} span in the trace"
        return found[0]

    def chain(service: str, name: str) -> list[str]:
        return _ancestors(one(service, name).span, by_id)

    # The request's path, process by process, each step below the one before it.
    assert chain("gateway", "queue.wait")[-1] == f"gateway:{root.span.name}"
    assert "gateway:queue.wait" in chain("scheduler", "claim")
    assert {"scheduler:claim", "gateway:queue.wait"} <= set(chain("nodeagent", "restore"))
    for name in ("dma.prepare", "driver_restore", "attach"):
        assert chain("nodeagent", name)[0] == "nodeagent:restore"
    assert "nodeagent:dma.prepare" in chain("blobstore", "dma")
    assert chain("modelserver", "attach")[0] == "nodeagent:attach"
    assert chain("scheduler", "cold_start")[0] == "scheduler:claim"
    assert chain("scheduler", "placement")[0] == "scheduler:claim"
    assert f"gateway:{root.span.name}" in chain("modelserver", "generate")
    assert chain("gateway", "first_token")[-1] == f"gateway:{root.span.name}"
