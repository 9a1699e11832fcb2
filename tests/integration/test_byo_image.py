"""Bring your own image, for real: etcd, the four services as processes, a real Debian+python3
OCI image (``debian_python_image``, a session fixture of tests/conftest.py) unpacked by the
node's image cache and run by runc in its sandbox, deployed through the CLI, and the real
``openai`` client against the gateway.

The fixture's ``.ref(variant)`` is an ``oci-archive:`` reference to one tag of its archive:
"serve" (a small OpenAI-style server, ``.served_model`` on ``.port``), "exits" (exits at once)
and "no-port" (never listens); ``.archive`` is the tar itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from snapwake import cli
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

START_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, debian_python_image: Any) -> Iterator[Cluster]:
    var = tmp_path_factory.mktemp("byo-cluster")
    # One validation attempt, so a broken image fails its deploy in one start timeout, and a
    # crash loop of two: these tests look at the reasons, not at the retries. The node serves
    # local images from the test image's dir (SNAPWAKE_TEST_IMAGE_DIR may put it anywhere) and
    # from the test's temporary dirs.
    roots = f"{debian_python_image.archive.parent},{tmp_path_factory.getbasetemp()}"
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                           etcd_port=0, extra_args={"scheduler": ["--snapshot-attempts", "1",
                                                                  "--crash-loop-limit", "2"],
                                                    "nodeagent": ["--image-local-roots", roots]})
    with Cluster(config) as c:
        yield c


def _cli(cluster: Cluster, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--scheduler", cluster.scheduler_address, *cluster.cli_args(), "--timeout", "20", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _deploy(cluster: Cluster, capsys: pytest.CaptureFixture[str], name: str, reference: str, image: Any,
            *flags: str) -> tuple[int, str, str]:
    return _cli(cluster, capsys, "-o", "json", "deploy", "--name", name, "--image", reference,
                "--served-model-name", image.served_model, "--port", str(image.port),
                "--start-timeout", f"{START_TIMEOUT_S}s", *flags, "--wait", "--wait-timeout", "600")


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _admin(cluster: Cluster) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerServiceStub]:
    ch = cluster.admin_channel()
    return ch, scheduler_pb2_grpc.SchedulerServiceStub(ch)


def _image_files(cluster: Cluster, digest: str) -> set[Path]:
    """Files of the node's state dir named after ``digest`` (its cache entry, however laid out)."""
    return set(cluster.state_dir("nodeagent").rglob(f"*{digest.removeprefix('sha256:')}*"))


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, debian_python_image: Any) -> dict[str, Any]:
    """The image deployed once as "byo" through the CLI (module scoped, so capsys cannot be used)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--scheduler", cluster.scheduler_address, *cluster.cli_args(), "--timeout", "20", "-o", "json", "deploy",
                         "--name", "byo", "--image", debian_python_image.ref("serve"),
                         "--served-model-name", debian_python_image.served_model,
                         "--port", str(debian_python_image.port), "--start-timeout", f"{START_TIMEOUT_S}s",
                         "--wait", "--wait-timeout", "600"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def test_a_deployed_image_is_ready_and_pinned(deployed: dict[str, Any]) -> None:
    assert deployed["state"] == "FUNCTION_STATE_READY" and deployed["status_message"] == ""
    assert deployed["image_digest"].startswith("sha256:") and len(deployed["image_digest"]) == 71


def test_chat_completion_through_the_gateway_streamed_and_not(cluster: Cluster, deployed: dict[str, Any]) -> None:
    client = _client(cluster)
    assert "byo" in {m.id for m in client.models.list()}
    chat = client.chat.completions.create(model="byo", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=8)
    assert chat.model == "byo" and chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model="byo", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True))
    assert chunks and {c.model for c in chunks} == {"byo"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_second_deploy_of_the_same_image_hits_the_image_cache(
        cluster: Cluster, deployed: dict[str, Any], debian_python_image: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    digest = deployed["image_digest"]
    cached = _image_files(cluster, digest)
    assert cached, "the first deploy left no cache entry named after its digest"
    code, out, err = _deploy(cluster, capsys, "byo-again", debian_python_image.ref("serve"), debian_python_image)
    assert code == 0, err
    again = json.loads(out)
    assert (again["state"], again["image_digest"]) == ("FUNCTION_STATE_READY", digest)
    assert _image_files(cluster, digest) == cached  # nothing pulled or unpacked again
    assert _cli(cluster, capsys, "delete", "default/default/byo-again")[0] == 0


def test_a_bad_reference_fails_the_deploy_with_a_clear_message(
        cluster: Cluster, debian_python_image: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _cli(cluster, capsys, "deploy", "--name", "badref", "--image", "oci-archive:relative/img.tar")
    assert (code, out) == (2, "") and "spec.image" in err and "must be absolute" in err
    missing = tmp_path / "missing.tar"
    code, out, err = _deploy(cluster, capsys, "nofile", f"oci-archive:{missing}", debian_python_image)
    assert (code, out) == (6, "") and "FAILED" in err and str(missing) in err


def test_an_image_that_exits_at_once_fails_its_deploy_with_the_log_tail(
        cluster: Cluster, debian_python_image: Any, capsys: pytest.CaptureFixture[str]) -> None:
    began = time.monotonic()
    code, out, err = _deploy(cluster, capsys, "exits", debian_python_image.ref("exits"), debian_python_image)
    assert (code, out) == (6, "")
    assert "exited before it was ready" in err and "exit status" in err and "container output:" in err
    assert time.monotonic() - began < START_TIMEOUT_S + 60  # not the start timeout: it exited


def test_an_image_that_never_listens_fails_on_the_start_timeout(
        cluster: Cluster, debian_python_image: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _deploy(cluster, capsys, "deaf", debian_python_image.ref("no-port"), debian_python_image)
    assert (code, out) == (6, "")
    assert f"within {START_TIMEOUT_S}s" in err and "never answered 200" in err
    assert f"container port {debian_python_image.port}" in err


def test_a_container_killed_later_is_reported(cluster: Cluster, deployed: dict[str, Any]) -> None:
    _client(cluster).chat.completions.create(model="byo", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    ch, admin = _admin(cluster)
    with ch:
        serving = [i for i in admin.ListInstances(scheduler_pb2.ListInstancesRequest(
            function_id="default/default/byo"), timeout=10).instances
            if i.state in (types_pb2.INSTANCE_STATE_RUNNING, types_pb2.INSTANCE_STATE_IDLE)]
        assert serving
        victim = serving[0]
        subprocess.run(["runc", "--root", str(cluster.state_dir("nodeagent") / "runc"), "kill",
                        "sw-" + victim.id, "KILL"], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while True:
            got = {i.id: i for i in admin.ListInstances(scheduler_pb2.ListInstancesRequest(
                function_id="default/default/byo"), timeout=10).instances}.get(victim.id)
            if got is not None and got.state == types_pb2.INSTANCE_STATE_FAILED:
                break
            assert time.monotonic() < deadline, f"the killed instance is still {got}"
            time.sleep(0.5)
    assert "container exited unexpectedly" in got.message
