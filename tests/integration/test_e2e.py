"""The whole request path for real: etcd, the four services as processes, runc containers,
and the real ``openai`` client against the gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from snapwake.devcluster import Cluster, ClusterConfig, deploy_demo
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

pytestmark = pytest.mark.integration


def _runc_containers(root: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True)
    return [line for line in out.stdout.split() if line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Cluster]:
    var = tmp_path_factory.mktemp("cluster")
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0,
                           blobstore_port=0, etcd_port=0)
    with Cluster(config) as c:
        asyncio.run(deploy_demo(c.scheduler_address, demo_model_dir, timeout=240, tls=c.client_tls()))
        yield c


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_demo(cluster: Cluster) -> None:
    ids = [m.id for m in _client(cluster).models.list()]
    assert "demo" in ids


def test_chat_completion_streamed_through_every_service(cluster: Cluster) -> None:
    stream = _client(cluster).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello there"}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1
    assert text, "the stream carried no text"


def test_greedy_is_repeatable_and_matches_streaming(cluster: Cluster) -> None:
    client = _client(cluster)
    kwargs = dict(model="demo", prompt="the quick brown", max_tokens=6, temperature=0)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert a.choices[0].text == b.choices[0].text == streamed
    assert a.usage.completion_tokens == 6 or a.choices[0].finish_reason == "stop"


def test_unknown_model_is_404_with_param(cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        _client(cluster).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "model"


def test_per_function_url(cluster: Cluster) -> None:
    r = httpx.post(cluster.gateway_url + "/funcs/default/default/demo/v1/chat/completions",
                   json={"model": "anything", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.headers.get("x-request-id")


def test_failed_start_answers_503_fast(cluster: Cluster, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="broken", image="builtin",
                                  model_dir=str(broken))
    spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_NONE
    spec.policy.start_timeout.FromSeconds(60)
    with cluster.admin_channel() as ch:
        scheduler_pb2_grpc.SchedulerServiceStub(ch).CreateFunction(
            scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        _client(cluster).chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503
    assert "start" in str(err.value.body).lower()
    assert time.monotonic() - t0 < 60


def test_logs_and_instances_visible_through_admin_api(cluster: Cluster) -> None:
    with cluster.admin_channel() as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        instances = stub.ListInstances(scheduler_pb2.ListInstancesRequest(function_id="default/default/demo"),
                                       timeout=10).instances
        serving = [i for i in instances if i.state in (types_pb2.INSTANCE_STATE_RUNNING,
                                                       types_pb2.INSTANCE_STATE_IDLE)]
        assert serving, instances
        logs = stub.GetInstanceLogs(scheduler_pb2.GetInstanceLogsRequest(instance_id=serving[0].id), timeout=10)
        assert logs.logs
        with pytest.raises(grpc.RpcError) as err:
            stub.GetFunction(scheduler_pb2.GetFunctionRequest(function_id="default/default/missing"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class GrpcurlLine:
    """One README grpcurl line, its flags parsed."""

    address: str
    method: str
    body: str = "{}"
    cacert: str = ""
    cert: str = ""
    key: str = ""
    headers: tuple[str, ...] = ()


def readme_grpcurl_lines() -> list[GrpcurlLine]:
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    found = []
    for line in re.findall(r"^grpcurl .*$", readme.replace("\\\n", " ").replace("\n  ", " "), re.M):
        words = shlex.split(line.split(" #")[0])[1:]
        flags: dict[str, list[str]] = {}
        while words[0].startswith("-"):
            flags.setdefault(words[0].lstrip("-"), []).append(words[1])
            words = words[2:]
        found.append(GrpcurlLine(words[0], words[1] if len(words) > 1 else "list", flags.get("d", ["{}"])[0],
                                 flags.get("cacert", [""])[0], flags.get("cert", [""])[0], flags.get("key", [""])[0],
                                 tuple(flags.get("H", []))))
    return found


def _grpcurl(cluster: Cluster, line: GrpcurlLine, address: str, body: str) -> dict:
    """What ``grpcurl`` does with ``line``: TLS with its -cacert (and -cert/-key), its -H headers,
    resolve the method through server reflection (no generated code), encode the JSON body, call,
    decode the answer to JSON. grpcurl itself is used when installed (it is in no Debian, PyPI or
    npm package); this is the same call from Python."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from snapwake.grpcclient import blocking_channel
    from snapwake.tlsconfig import ClientTls

    local = lambda path: cluster.pki_dir / Path(path).relative_to("var/pki")  # noqa: E731
    # $TOKEN: the operator token make run writes; a cluster without admin_auth takes none.
    token = cluster.token_file.read_text().strip() if cluster.token_file.exists() else ""
    headers = [tuple(h.replace("$TOKEN", token).split(": ", 1)) for h in line.headers if token or "$TOKEN" not in h]
    if shutil.which("grpcurl"):
        argv = ["grpcurl", "-cacert", str(local(line.cacert)), *(["-cert", str(local(line.cert)), "-key",
                str(local(line.key))] if line.cert else []), *[a for k, v in headers for a in ("-H", f"{k}: {v}")],
                *(["-d", body] if line.method != "list" else []), address, *([line.method] if line.method != "list" else [])]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
        return {"services": out.split()} if line.method == "list" else json.loads(out)
    tls = ClientTls(local(line.cacert).read_bytes(), *((local(line.cert).read_bytes(), local(line.key).read_bytes())
                                                         if line.cert else ()))
    with blocking_channel(address, tls) as ch:
        if line.method == "list":
            return {"services": list(ProtoReflectionDescriptorDatabase(ch).get_services())}
        service_name, method_name = line.method.rsplit("/", 1)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        desc = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        req_cls = message_factory.GetMessageClass(desc.input_type)
        resp_cls = message_factory.GetMessageClass(desc.output_type)
        call = ch.unary_unary(f"/{service_name}/{method_name}", request_serializer=req_cls.SerializeToString,
                              response_deserializer=resp_cls.FromString)
        return json_format.MessageToDict(call(json_format.Parse(body, req_cls()), timeout=30,
                                              metadata=[(k.lower(), v) for k, v in headers]))


def test_readme_grpcurl_lines_work_through_reflection(cluster: Cluster, demo_model_dir: Path) -> None:
    """The README's grpcurl lines, with their TLS flags, run through reflection as grpcurl runs them."""
    lines = readme_grpcurl_lines()
    admin = [ln for ln in lines if ln.address == "127.0.0.1:7001"]
    assert {ln.method for ln in admin} >= {"list", "snapwake.v1.SchedulerService/ListFunctions",
                                           "snapwake.v1.SchedulerService/CreateFunction",
                                           "snapwake.v1.SchedulerService/ListInstances"}, lines
    assert all(ln.cacert == "var/pki/ca.crt" and not ln.cert for ln in admin)
    assert all(any(h.startswith("authorization: Bearer ") for h in ln.headers) for ln in admin if ln.method != "list")
    answers = {}
    # The API-key calls need the scheduler's API-key secret, which only admin_auth clusters have.
    for line in [ln for ln in admin if "ApiKey" not in ln.method or cluster.config.admin_auth]:
        body = line.body.replace("/models/my-llama", str(demo_model_dir))
        answers[line.method] = _grpcurl(cluster, line, cluster.scheduler_address, body)
    assert {"snapwake.v1.SchedulerService", "snapwake.v1.ClaimService",
            "grpc.health.v1.Health"} <= set(answers["list"]["services"])
    created = answers["snapwake.v1.SchedulerService/CreateFunction"]["function"]
    assert created["id"] == "default/default/mymodel" and created["spec"]["modelDir"] == str(demo_model_dir)
    listed = answers["snapwake.v1.SchedulerService/ListFunctions"].get("functions", [])
    assert any(f["id"] == "default/default/demo" for f in listed)
    assert all(i["functionId"] == "default/default/demo"
               for i in answers["snapwake.v1.SchedulerService/ListInstances"].get("instances", []))
    # The line that lists a nodeagent's mutual-TLS port with the scheduler's certificate.
    (node,) = [ln for ln in lines if ln.cert]
    assert node.cert == "var/pki/scheduler/tls.crt"
    assert "snapwake.v1.NodeAgentService" in _grpcurl(cluster, node, cluster.internal_address("nodeagent"), "{}")["services"]
    with cluster.admin_channel() as ch:
        scheduler_pb2_grpc.SchedulerServiceStub(ch).DeleteFunction(
            scheduler_pb2.DeleteFunctionRequest(function_id="default/default/mymodel"), timeout=10)


def test_the_gateway_refuses_what_the_recorded_model_cannot_serve(cluster: Cluster) -> None:
    """The demo's snapshot build recorded its model (Function.model); a request beyond its context,
    or one the model server would refuse anyway, is answered by the gateway, not an instance."""
    deadline = time.monotonic() + 30
    with cluster.admin_channel() as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        while not (fn := stub.GetFunction(scheduler_pb2.GetFunctionRequest(function_id="default/default/demo"),
                                          timeout=10).function).HasField("model"):
            assert time.monotonic() < deadline, "no model metadata recorded for the demo"
            time.sleep(0.2)
    assert fn.model.max_context_tokens > 0 and fn.model.vocab_size > 0 and fn.model.has_chat_template
    client = _client(cluster)
    for kwargs, param in [({"max_tokens": fn.model.max_context_tokens}, "max_tokens"),
                          ({"logit_bias": {str(fn.model.vocab_size): 1}}, "logit_bias"), ({"n": 1000}, "n")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], **kwargs)
        assert err.value.body["param"] == param
        assert "x-snapwake-instance" not in err.value.response.headers  # no instance answered it
