"""The dashboard through the real gateway, the real gRPC client and a small real gRPC scheduler.

``TinyScheduler`` is a real ``SchedulerService``/``ClaimService`` server written for these tests
(one function with a standby instance that a claim turns RUNNING, then IDLE); the instance is a
small echo OpenAI server. The whole stack runs in one event loop on a background thread, so the
tests (and Selenium, which blocks) drive it from outside like any HTTP client. The integration
layer runs the same browser checks against the real cluster.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from dashboard_driver import badges, chromium, script_errors, wait
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.gateway import GatewayConfig, build_app
from services.gateway.dashboard.auth import COOKIE
from services.gateway.scheduler_client import GrpcSchedulerClient
from snapwake.grpcserver import GrpcServer
from snapwake.testing import free_port
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")
GiB = 1 << 30
DEMO, OTHER = "default/default/demo", "acme/default/secret"
KEY = "sk-dash"


async def _echo(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "hi"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


class TinyScheduler(scheduler_pb2_grpc.SchedulerServiceServicer, scheduler_pb2_grpc.ClaimServiceServicer):
    """One node, the demo function with one standby instance, and another tenant's instance."""

    def __init__(self, endpoint: str) -> None:
        now = Timestamp(seconds=int(time.time()))
        spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="demo",
                              resources=types_pb2.Resources(gpu_memory_bytes=2 * GiB))
        self.functions = [types_pb2.Function(id=DEMO, revision=1, state=types_pb2.FUNCTION_STATE_READY, spec=spec),
                          types_pb2.Function(id=OTHER, revision=3, state=types_pb2.FUNCTION_STATE_READY)]
        self.demo = types_pb2.Instance(id="i-0123456789ab", function_id=DEMO, node="node-0", gpu_index=0,
                               gpu_memory_bytes=2 * GiB, state=types_pb2.INSTANCE_STATE_STANDBY, endpoint=endpoint)
        self.other = types_pb2.Instance(id="i-ffffffffffff", function_id=OTHER, node="node-0", gpu_index=0,
                                gpu_memory_bytes=3 * GiB, state=types_pb2.INSTANCE_STATE_RUNNING, update_time=now)
        self.nodes = [types_pb2.Node(name="node-0", address="127.0.0.1:7002", heartbeat_time=now,
                             cached_snapshots=[DEMO + "@1", OTHER + "@3"],
                             gpus=[types_pb2.Gpu(index=0, name="demo GPU", memory_total_bytes=8 * GiB)])]
        self.snapshots = [types_pb2.Snapshot(id=DEMO + "@1", function_id=DEMO, revision=1, state=types_pb2.SNAPSHOT_STATE_READY,
                                     total_bytes=GiB, bytes_written=GiB, disk_nodes=["node-0"],
                                     cache_nodes=["node-0"]),
                          types_pb2.Snapshot(id=OTHER + "@3", function_id=OTHER, revision=3, state=types_pb2.SNAPSHOT_STATE_READY)]
        self.hang_seconds = 0.0

    async def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest, context: Any) -> scheduler_pb2.ListFunctionsResponse:
        return scheduler_pb2.ListFunctionsResponse(functions=self.functions)

    async def ListInstances(self, request: scheduler_pb2.ListInstancesRequest, context: Any) -> scheduler_pb2.ListInstancesResponse:
        return scheduler_pb2.ListInstancesResponse(instances=[self.demo, self.other])

    async def ListNodes(self, request: scheduler_pb2.ListNodesRequest, context: Any) -> scheduler_pb2.ListNodesResponse:
        await asyncio.sleep(self.hang_seconds)
        return scheduler_pb2.ListNodesResponse(nodes=self.nodes)

    async def ListSnapshots(self, request: scheduler_pb2.ListSnapshotsRequest, context: Any) -> scheduler_pb2.ListSnapshotsResponse:
        return scheduler_pb2.ListSnapshotsResponse(snapshots=self.snapshots)

    async def AcquireClaim(self, request: scheduler_pb2.AcquireClaimRequest, context: Any) -> scheduler_pb2.AcquireClaimResponse:
        await asyncio.sleep(0.3)  # the "restore", long enough for a poll to miss or catch it
        self.demo.state, self.demo.last_start_seconds = types_pb2.INSTANCE_STATE_RUNNING, 0.3
        self.demo.update_time.GetCurrentTime()
        return scheduler_pb2.AcquireClaimResponse(claim_id="c-1", instance_id=self.demo.id, endpoint=self.demo.endpoint,
                                       source=scheduler_pb2.CLAIM_SOURCE_COLD_START, wait=Duration(nanos=300_000_000))

    async def ReleaseClaim(self, request: scheduler_pb2.ReleaseClaimRequest, context: Any) -> scheduler_pb2.ReleaseClaimResponse:
        self.demo.state = types_pb2.INSTANCE_STATE_IDLE
        return scheduler_pb2.ReleaseClaimResponse()

    async def ReportQueue(self, request: scheduler_pb2.ReportQueueRequest, context: Any) -> scheduler_pb2.ReportQueueResponse:
        return scheduler_pb2.ReportQueueResponse()


class Stack:
    """Echo instance, TinyScheduler and gateway in one event loop on a background thread."""

    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.keys = keys
        self.scheduler_port = free_port()
        self.grpc: GrpcServer | None = None
        self.servers: list[tuple[uvicorn.Server, asyncio.Future[None]]] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, app: Any) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                               lifespan="on", timeout_graceful_shutdown=1))
        task = asyncio.ensure_future(server.serve())
        self.servers.append((server, task))
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn exited during start-up"
                await asyncio.sleep(0.01)
        return f"127.0.0.1:{port}"

    async def start_scheduler(self) -> None:
        names = [scheduler_pb2.DESCRIPTOR.services_by_name[s].full_name for s in ("SchedulerService", "ClaimService")]
        self.grpc = GrpcServer(f"127.0.0.1:{self.scheduler_port}", names)
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.scheduler, self.grpc.server)
        scheduler_pb2_grpc.add_ClaimServiceServicer_to_server(self.scheduler, self.grpc.server)
        await self.grpc.start()

    async def stop_scheduler(self) -> None:
        assert self.grpc is not None
        await self.grpc.stop(0)

    async def _up(self) -> None:
        self.scheduler = TinyScheduler(await self._serve(Starlette(routes=[
            Route("/v1/chat/completions", _echo, methods=["POST"])])))
        await self.start_scheduler()
        self.client = GrpcSchedulerClient([f"127.0.0.1:{self.scheduler_port}"], "gw-test", rpc_timeout=3)
        config = GatewayConfig(api_keys=self.keys, report_interval=0.5, read_timeout=5)
        self.url = "http://" + await self._serve(build_app(self.client, config))

    async def _down(self) -> None:
        for server, task in reversed(self.servers):
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        await self.stop_scheduler()
        await self.client.close()

    def __enter__(self) -> Stack:
        self.thread.start()
        self.run(self._up())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def stack() -> Iterator[Stack]:
    with Stack() as s:
        yield s


def _eventually(get: Any, check: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = get()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {seconds}s; last: {value}")
        time.sleep(0.1)


def _chat(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=10, **kwargs,
                      json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def test_state_comes_through_grpc_and_follows_a_request(stack: Stack) -> None:
    st = httpx.get(stack.url + "/dashboard/api/state", timeout=5).json()
    demo = next(f for f in st["functions"] if f["id"] == DEMO)
    assert demo["instances_by_state"] == {"STANDBY": 1} and st["cold_starts"] == []
    # acme/... sorts first; its record names no cache node, the node record does
    assert [(s["tier"], s["cache_nodes"]) for s in st["snapshots"]] == [("cache", ["node-0"])] * 2
    assert _chat(stack.url).status_code == 200
    st = httpx.get(stack.url + "/dashboard/api/state", timeout=5).json()
    demo = next(f for f in st["functions"] if f["id"] == DEMO)
    assert demo["instances_by_state"] == {"IDLE": 1}
    assert [(c["instance_id"], c["seconds"]) for c in st["cold_starts"]] == [("i-0123456789ab", 0.3)]
    assert [s["function_id"] for s in st["nodes"][0]["gpus"][0]["slices"]] == [DEMO, OTHER]


def test_outage_is_503_and_recovers(stack: Stack) -> None:
    stack.run(stack.stop_scheduler())
    down = httpx.get(stack.url + "/dashboard/api/state", timeout=10)
    assert down.status_code == 503 and down.json()["error"].startswith("scheduler unreachable: ")
    stack.run(stack.start_scheduler())
    up = _eventually(lambda: httpx.get(stack.url + "/dashboard/api/state", timeout=10),
                     lambda r: r.status_code == 200, 15, "dashboard recovery")
    assert up.json()["functions"][0]["id"] == OTHER


def test_hung_scheduler_is_bounded(stack: Stack) -> None:
    stack.scheduler.hang_seconds = 10
    started = time.monotonic()
    resp = httpx.get(stack.url + "/dashboard/api/state", timeout=10)
    assert resp.status_code == 503 and "no answer within 2s" in resp.json()["error"]
    assert time.monotonic() - started < 5


def test_keys_gate_the_dashboard_and_scope_it_to_the_tenant() -> None:
    with Stack(keys=(f"{KEY}:default", "sk-acme:acme")) as stack, \
            httpx.Client(base_url=stack.url, timeout=5) as browser:
        ask = browser.get("/dashboard/")
        assert ask.status_code == 401 and "/dashboard/?key=YOUR_KEY" in ask.text
        assert browser.get("/dashboard/api/state").json()["error"]["message"] == "Missing API key"
        assert browser.get("/dashboard/?key=wrong").status_code == 401
        login = browser.get("/dashboard/?key=" + KEY)
        assert login.status_code == 303 and login.headers["location"] == "/dashboard/"
        assert "httponly" in login.headers["set-cookie"].lower() and browser.cookies[COOKIE] == KEY
        assert "api/state" in browser.get("/dashboard/").text
        st = browser.get("/dashboard/api/state").json()
        assert st["tenant"] == "default" and [f["id"] for f in st["functions"]] == [DEMO]
        assert [s["id"] for s in st["snapshots"]] == [DEMO + "@1"]
        assert st["nodes"][0]["cached_snapshots"] == [DEMO + "@1"]
        other = st["nodes"][0]["gpus"][0]["slices"]
        assert other == [{"instance_id": "", "function_id": "(other tenant)", "bytes": 3 * GiB, "state": ""}]
        bearer = httpx.get(stack.url + "/dashboard/api/state", headers={"Authorization": "Bearer sk-acme"}).json()
        assert [f["id"] for f in bearer["functions"]] == [OTHER]
        assert _chat(stack.url).status_code == 401  # the cookie opens the dashboard, not the API


# --- the page in a real headless Chromium ---------------------------------------------------



@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "chromium", required=False) as driver:
        yield driver


def _badges(driver: Any) -> list[str]:
    return badges(driver, DEMO)


def test_page_in_chromium_follows_state_and_outage(stack: Stack, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(stack.url + "/dashboard/")
    before = wait(browser, lambda d: _badges(d) or False, 15, "the demo function")
    assert before == ["READY", "STANDBY 1"]
    assert _chat(stack.url).status_code == 200
    after = wait(browser, lambda d: [b for b in _badges(d) if b.split()[0] in ("RUNNING", "IDLE")], 10,
                  "a RUNNING or IDLE demo instance")
    assert after != before and "i-0123456789ab" in browser.find_element(By.ID, "coldstarts").text
    assert "300 ms" in browser.find_element(By.ID, "coldstarts").text
    banner = browser.find_element(By.ID, "banner")
    assert not banner.is_displayed()
    stack.run(stack.stop_scheduler())
    wait(browser, lambda d: banner.is_displayed() and "scheduler unreachable" in banner.text, 15, "the banner")
    stack.run(stack.start_scheduler())
    wait(browser, lambda d: not banner.is_displayed(), 20, "the banner going away")
    assert browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert script_errors(browser) == []


def test_page_in_chromium_with_a_key(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    with Stack(keys=(f"{KEY}:default",)) as stack:
        browser.get(stack.url + "/dashboard/")
        assert "?key=YOUR_KEY" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(stack.url + "/dashboard/?key=" + KEY)
        assert wait(browser, lambda d: _badges(d) or False, 15, "the demo function") == ["READY", "STANDBY 1"]
        assert browser.current_url == stack.url + "/dashboard/"  # the key left the address bar
        assert "(other tenant)" in browser.find_element(By.ID, "nodes").get_attribute("innerHTML")
        assert "tenant default" in browser.find_element(By.ID, "updated").text
        assert OTHER not in browser.page_source
