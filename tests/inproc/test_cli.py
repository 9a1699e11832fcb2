"""The snapwake CLI against a small real SchedulerService gRPC server defined here.

The server keeps functions in memory and builds a "snapshot" a third at a time on each
ListSnapshots, so ``deploy --wait`` sees real progress; the real scheduler has its own tests.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from snapwake import cli
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SIZE = 3 << 20
DIGEST = "sha256:" + "c0" * 32
BROKEN = ("deploy of image registry.local/broken:1 failed after 3 attempts: node node-a: start of i-0: "
          "the container exited before it was ready (exit status 3); container output:\n"
          "Traceback (most recent call last):\nRuntimeError: CUDA driver not found")


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """In-memory admin API with just enough behaviour for the CLI."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.functions: dict[str, types_pb2.Function] = {}
        self.snapshots: dict[str, types_pb2.Snapshot] = {}
        self.instances: list[types_pb2.Instance] = []
        self.validating: dict[str, int] = {}  # user-image function id -> GetFunction polls seen
        self.cordons: dict[str, types_pb2.NodeCordon] = {}

    def CreateFunction(self, request: scheduler_pb2.CreateFunctionRequest, context: grpc.ServicerContext) -> scheduler_pb2.CreateFunctionResponse:
        spec = request.spec
        for field in ("tenant", "namespace", "name"):
            if not _NAME.match(getattr(spec, field)):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"spec.{field}: {getattr(spec, field)!r} "
                              "must match [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
        fid = f"{spec.tenant}/{spec.namespace}/{spec.name}"
        with self.lock:
            if fid in self.functions:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"function {fid} already exists")
            fn = types_pb2.Function(id=fid, spec=spec, revision=1, state=types_pb2.FUNCTION_STATE_PENDING)
            self.functions[fid] = fn
            if spec.image not in ("", "builtin"):  # validated by a node: settles on the third poll
                self.validating[fid] = 0
                return scheduler_pb2.CreateFunctionResponse(function=fn)
            self.snapshots[fid] = types_pb2.Snapshot(id=f"{fid}@1", function_id=fid, revision=1, total_bytes=SIZE,
                                             state=types_pb2.SNAPSHOT_STATE_BUILDING)
        return scheduler_pb2.CreateFunctionResponse(function=fn)

    def GetFunction(self, request: scheduler_pb2.GetFunctionRequest, context: grpc.ServicerContext) -> scheduler_pb2.GetFunctionResponse:
        with self.lock:
            if request.function_id not in self.functions:
                context.abort(grpc.StatusCode.NOT_FOUND, f"function {request.function_id} not found")
            fn = self.functions[request.function_id]
            if request.function_id in self.validating:
                self.validating[request.function_id] += 1
                if self.validating[request.function_id] == 3 and "broken" in fn.spec.image:
                    fn.state, fn.status_message = types_pb2.FUNCTION_STATE_FAILED, BROKEN
                elif self.validating[request.function_id] == 3:
                    fn.state, fn.image_digest = types_pb2.FUNCTION_STATE_READY, DIGEST
            return scheduler_pb2.GetFunctionResponse(function=fn)

    def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest, context: grpc.ServicerContext) -> scheduler_pb2.ListFunctionsResponse:
        with self.lock:
            return scheduler_pb2.ListFunctionsResponse(functions=list(self.functions.values()))

    def DeleteFunction(self, request: scheduler_pb2.DeleteFunctionRequest, context: grpc.ServicerContext) -> scheduler_pb2.DeleteFunctionResponse:
        with self.lock:
            if self.functions.pop(request.function_id, None) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"function {request.function_id} not found")
        return scheduler_pb2.DeleteFunctionResponse()

    def ListSnapshots(self, request: scheduler_pb2.ListSnapshotsRequest, context: grpc.ServicerContext) -> scheduler_pb2.ListSnapshotsResponse:
        with self.lock:
            for fid, snap in self.snapshots.items():
                if snap.state == types_pb2.SNAPSHOT_STATE_BUILDING:
                    snap.bytes_written = min(SIZE, snap.bytes_written + SIZE // 3)
                if snap.bytes_written == SIZE and snap.state == types_pb2.SNAPSHOT_STATE_BUILDING:
                    snap.state = types_pb2.SNAPSHOT_STATE_READY
                    snap.disk_nodes.append("node-a")
                    self.functions[fid].state = types_pb2.FUNCTION_STATE_READY
                    self.instances.append(types_pb2.Instance(id="i-0000000000aa", function_id=fid, revision=1,
                                                     node="node-a", state=types_pb2.INSTANCE_STATE_STANDBY))
            return scheduler_pb2.ListSnapshotsResponse(snapshots=[s for s in self.snapshots.values()
                                                       if request.function_id in ("", s.function_id)])

    def ListNodes(self, request: scheduler_pb2.ListNodesRequest, context: grpc.ServicerContext) -> scheduler_pb2.ListNodesResponse:
        gpu = types_pb2.Gpu(index=0, name="H100", memory_total_bytes=80 << 30, memory_reserved_bytes=20 << 30)
        with self.lock:
            return scheduler_pb2.ListNodesResponse(
                nodes=[types_pb2.Node(name="node-a", address="10.0.0.1:7001", gpus=[gpu], cached_snapshots=["t/d/m@1"])],
                cordons=list(self.cordons.values()))

    def ListInstances(self, request: scheduler_pb2.ListInstancesRequest, context: grpc.ServicerContext) -> scheduler_pb2.ListInstancesResponse:
        with self.lock:
            for inst in self.instances:  # a drain moves one instance off its node per poll
                cordon = self.cordons.get(inst.node)
                if cordon is not None and cordon.drain and inst.state != types_pb2.INSTANCE_STATE_ENDED:
                    inst.state = types_pb2.INSTANCE_STATE_ENDED
                    break
            return scheduler_pb2.ListInstancesResponse(instances=[i for i in self.instances
                                                       if request.function_id in ("", i.function_id)])

    def CordonNode(self, request: scheduler_pb2.CordonNodeRequest, context: grpc.ServicerContext) -> scheduler_pb2.CordonNodeResponse:
        if request.node != "node-a":
            context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.node} is not registered")
        with self.lock:
            cordon = self.cordons[request.node] = types_pb2.NodeCordon(node=request.node, drain=request.drain,
                                                                       reason=request.reason)
        return scheduler_pb2.CordonNodeResponse(cordon=cordon)

    def UncordonNode(self, request: scheduler_pb2.UncordonNodeRequest, context: grpc.ServicerContext) -> scheduler_pb2.UncordonNodeResponse:
        with self.lock:
            if self.cordons.pop(request.node, None) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"node {request.node} is not cordoned")
        return scheduler_pb2.UncordonNodeResponse()

    def GetInstanceLogs(self, request: scheduler_pb2.GetInstanceLogsRequest, context: grpc.ServicerContext) -> scheduler_pb2.GetInstanceLogsResponse:
        if request.instance_id != "i-0000000000aa":
            context.abort(grpc.StatusCode.NOT_FOUND, f"instance {request.instance_id} not found")
        return scheduler_pb2.GetInstanceLogsResponse(logs="loading model\nserving on 127.0.0.1:9000\n")


class NotLeader(scheduler_pb2_grpc.SchedulerServiceServicer):
    """What a standby scheduler answers to every admin call."""


for _method in ("CreateFunction", "GetFunction", "ListFunctions", "ListNodes", "ListInstances"):
    setattr(NotLeader, _method, lambda self, req, ctx: ctx.abort(grpc.StatusCode.UNAVAILABLE, "not the leader"))


def _serve(servicer: scheduler_pb2_grpc.SchedulerServiceServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def sched() -> Iterator[tuple[FakeScheduler, str]]:
    fake = FakeScheduler()
    server, address = _serve(fake)
    yield fake, address
    server.stop(0)


def _cli(capsys: pytest.CaptureFixture[str], address: str, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--scheduler", address, "--plaintext", "--timeout", "5", *argv])
    out, err = capsys.readouterr()
    return code, out, err


SPEC = """\
name: llama
namespace: prod
tenant: acme
image: builtin
model_dir: /models/llama
sample_request: '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
resources: {gpu_count: 1, gpu_memory_bytes: 20GiB, host_memory_bytes: 4GiB}
policy:
  min_instances: 0
  max_instances: 3
  standby_per_node: 1
  concurrency: 4
  queue_timeout: 30s
  idle_timeout: 5m
  snapshot_mode: arena
env: {HF_HUB_OFFLINE: "1"}
"""


def test_yaml_deploy_with_wait_then_json_get(sched: tuple[FakeScheduler, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = sched
    (tmp_path / "spec.yaml").write_text(SPEC)
    code, out, err = _cli(capsys, address, "-o", "json", "deploy", "-f", str(tmp_path / "spec.yaml"),
                          "--max", "5", "--wait", "--wait-timeout", "20")
    assert code == 0, err
    deployed = json.loads(out)
    assert (deployed["id"], deployed["state"]) == ("acme/prod/llama", "FUNCTION_STATE_READY")
    spec = fake.functions["acme/prod/llama"].spec
    assert spec.resources.gpu_memory_bytes == 20 << 30
    assert spec.policy.max_instances == 5  # the flag wins over the file
    assert spec.policy.idle_timeout.seconds == 300
    assert spec.policy.snapshot_mode == types_pb2.SNAPSHOT_MODE_ARENA
    assert dict(spec.env) == {"HF_HUB_OFFLINE": "1"}
    assert "snapshot" in err and "pre-warm" in err  # both progress bars were shown
    code, out, _ = _cli(capsys, address, "-o", "json", "get", "acme/prod/llama")
    assert code == 0 and json.loads(out)["spec"]["policy"]["concurrency"] == 4


def test_flags_deploy_and_tables(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    code, _, err = _cli(capsys, address, "deploy", "--name", "demo", "--model-dir", "/m",
                        "--gpu-memory", "8GiB", "--min", "0", "--max", "2")
    assert code == 0, err
    code, out, _ = _cli(capsys, address, "list")
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "REV", "STATE"]
    assert row.split()[:5] == ["default/default/demo", "1", "PENDING", "-", "8.0Gi"]
    _cli(capsys, address, "snapshots")  # one poll: a third built
    code, out, _ = _cli(capsys, address, "snapshots", "default/default/demo")
    assert code == 0 and "BUILDING  66%" in out
    code, out, _ = _cli(capsys, address, "nodes")
    assert "0:20.0Gi/80.0Gi" in out.splitlines()[1]


def test_not_found_is_one_line_exit_3(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    for argv in (["get", "a/b/nope"], ["delete", "a/b/nope"], ["logs", "i-ffffffffffff"]):
        code, out, err = _cli(capsys, address, *argv)
        assert (code, out) == (3, "")
        assert err.count("\n") == 1 and err.startswith("snapwake: NotFound: ") and "not found" in err


def test_invalid_argument_names_the_field(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    code, _, err = _cli(capsys, address, "deploy", "--name", "Bad_Name")
    assert code == 2 and err.count("\n") == 1 and "spec.name: 'Bad_Name' must match" in err


@pytest.mark.parametrize("argv, field", [
    (["deploy", "--name", "x", "--gpu-memory", "lots"], "resources.gpu_memory_bytes: expected a size"),
    (["deploy", "--name", "x", "--idle-timeout", "soon"], "policy.idle_timeout: expected a duration"),
    (["deploy", "--name", "x", "--snapshot-mode", "magic"], "snapshot_mode"),
    (["deploy", "--name", "x", "--min", "few"], "min_instances"),
    (["deploy", "--name", "x", "--env", "NOEQUALS"], "--env: expected KEY=VALUE"),
])
def test_bad_local_input_exit_2(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str],
                                argv: list[str], field: str) -> None:
    fake, address = sched
    code, _, err = _cli(capsys, address, *argv)
    assert code == 2 and field in err and err.count("\n") == 1
    assert fake.functions == {}  # nothing was sent


def test_unknown_yaml_field_exit_2(sched: tuple[FakeScheduler, str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    (tmp_path / "s.yaml").write_text("name: x\nresources: {gpu_mem: 1}\n")
    code, _, err = _cli(capsys, address, "deploy", "-f", str(tmp_path / "s.yaml"))
    assert code == 2 and 'no field named "gpu_mem"' in err and err.count("\n") == 1


def test_already_exists_exit_4(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    assert _cli(capsys, address, "deploy", "--name", "dup")[0] == 0
    code, _, err = _cli(capsys, address, "deploy", "--name", "dup")
    assert code == 4 and "already exists" in err


def test_follows_the_leader_and_reports_unavailable(sched: tuple[FakeScheduler, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _, leader = sched
    standby, standby_addr = _serve(NotLeader())
    try:
        code, out, err = _cli(capsys, f"{standby_addr},{leader}", "-o", "json", "nodes")
        assert code == 0, err
        assert json.loads(out)["nodes"][0]["name"] == "node-a"
        code, out, err = _cli(capsys, standby_addr, "nodes")
        assert code == 5 and "not the leader" in err and err.count("\n") == 1
    finally:
        standby.stop(0)


def test_logs_and_usage_error(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = sched
    fake.instances.append(types_pb2.Instance(id="i-0000000000aa", function_id="a/b/c"))
    code, out, _ = _cli(capsys, address, "logs", "i-0000000000aa")
    assert code == 0 and out == "loading model\nserving on 127.0.0.1:9000\n"
    code, _, err = _cli(capsys, address, "frobnicate")
    assert code == 2 and "invalid choice" in err


USER_IMAGE_SPEC = {"name": "echo", "image": "docker://registry.local/echo:1", "served_model_name": "acme/Echo-1B",
                   "env": {"HF_HOME": "/tmp/hf"}, "policy": {"max_instances": 2, "start_timeout": "90s"}}


def test_deploy_a_user_image_from_a_json_spec_and_flags(sched: tuple[FakeScheduler, str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = sched
    (tmp_path / "spec.json").write_text(json.dumps(USER_IMAGE_SPEC))
    code, out, err = _cli(capsys, address, "-o", "json", "deploy", "-f", str(tmp_path / "spec.json"),
                          "--image", "oci-archive:/srv/images/echo.tar", "--port", "9000",
                          "--registry-secret", "acme-registry", "--args=--port 9000 --name 'two words'",
                          "--readiness-path", "/v1/models", "--warmup-request", '{"prompt": "hi", "max_tokens": 1}',
                          "--wait", "--wait-timeout", "20")
    assert code == 0, err
    deployed = json.loads(out)
    assert (deployed["state"], deployed["image_digest"]) == ("FUNCTION_STATE_READY", DIGEST)
    spec = fake.functions["default/default/echo"].spec
    assert (spec.image, spec.http_port, spec.served_model_name, spec.registry_secret, spec.health_path) == (
        "oci-archive:/srv/images/echo.tar", 9000, "acme/Echo-1B", "acme-registry", "/v1/models")  # flags win
    assert list(spec.args) == ["--port", "9000", "--name", "two words"]
    assert spec.sample_request == '{"prompt": "hi", "max_tokens": 1}' and dict(spec.env) == {"HF_HOME": "/tmp/hf"}
    assert spec.policy.start_timeout.seconds == 90 and spec.policy.max_instances == 2
    assert "validating oci-archive:/srv/images/echo.tar on a node" in err
    assert err.splitlines()[-1] == f"default/default/echo revision 1: READY, image oci-archive:/srv/images/echo.tar@{DIGEST}"


def test_a_failed_deploy_prints_the_nodes_reason_and_output(sched: tuple[FakeScheduler, str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    code, out, err = _cli(capsys, address, "deploy", "--name", "bad", "--image", "registry.local/broken:1",
                          "--wait", "--wait-timeout", "20")
    assert (code, out) == (6, "")
    lines = err.splitlines()
    failed = lines.index("snapwake: function default/default/bad revision 1 FAILED:")
    assert "exit status 3" in lines[failed + 1]
    assert lines[-2:] == ["Traceback (most recent call last):", "RuntimeError: CUDA driver not found"]


def test_deploy_without_wait_prints_the_pending_state(sched: tuple[FakeScheduler, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, address = sched
    code, out, err = _cli(capsys, address, "deploy", "--name", "later", "--image", "ghcr.io/acme/llm:2")
    assert code == 0 and "state: FUNCTION_STATE_PENDING" in out
    assert err == "default/default/later revision 1: PENDING, image ghcr.io/acme/llm:2\n"


def test_node_cordon_drain_and_uncordon(sched: tuple[FakeScheduler, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, address = sched
    fake.instances += [types_pb2.Instance(id=f"i-00000000000{n}", function_id="a/b/c", node="node-a",
                                          state=types_pb2.INSTANCE_STATE_RUNNING) for n in (1, 2)]
    code, out, err = _cli(capsys, address, "node", "cordon", "node-a", "--reason", "disk swap")
    assert (code, out) == (0, "node node-a cordoned\n"), err
    code, out, _ = _cli(capsys, address, "nodes")
    assert out.splitlines()[1].split()[:4] == ["node-a", "Cordoned", "(disk", "swap)"]
    assert fake.instances[0].state == types_pb2.INSTANCE_STATE_RUNNING  # a cordon moves nothing
    code, out, err = _cli(capsys, address, "node", "drain", "node-a")
    assert (code, out) == (0, "node node-a drained\n"), err
    assert err == "draining node-a: 1 instance left\n"  # one moved per poll here
    assert all(i.state == types_pb2.INSTANCE_STATE_ENDED for i in fake.instances)
    code, out, _ = _cli(capsys, address, "-o", "json", "nodes")
    assert json.loads(out)["cordons"][0]["drain"] is True
    code, out, _ = _cli(capsys, address, "node", "uncordon", "node-a")
    assert (code, out) == (0, "node node-a uncordoned\n")
    code, out, _ = _cli(capsys, address, "nodes")
    assert out.splitlines()[1].split()[:2] == ["node-a", "Ready"]
    code, _, err = _cli(capsys, address, "node", "uncordon", "node-a")
    assert code == 3 and "not cordoned" in err
    code, _, err = _cli(capsys, address, "node", "drain", "node-z", "--no-wait")
    assert code == 3 and "not registered" in err
