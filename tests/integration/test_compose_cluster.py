"""``make compose-up`` for real: the compose cluster built from Debian packages, a chat completion
through the published gateway port with the ``openai`` client, a request served on each of the
two nodes, then ``make compose-down`` leaving no container, network or volume behind.

The first run builds the base image with mmdebstrap and the services image (minutes); later runs
reuse both (build-images.sh keys the base image by its recipe, docker caches the layers).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from snapwake.grpcclient import blocking_channel
from snapwake.testing import free_port
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
PROJECT_LABEL = "label=com.docker.compose.project=snapwake"


@dataclass(frozen=True)
class Compose:
    base_url: str
    api_key: str
    admin: str
    token: str


def _make(target: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["make", "-s", target], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def _left(kind: str) -> list[str]:
    """The project's Docker objects of one kind (container, network, volume) still there."""
    argv = ["docker", "ps", "-aq"] if kind == "container" else ["docker", kind, "ls", "-q"]
    done = subprocess.run([*argv, "--filter", PROJECT_LABEL], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    env = {**os.environ, "SNAPWAKE_GATEWAY_PORT": str(free_port()), "SNAPWAKE_ADMIN_PORT": str(free_port())}
    env.pop("SNAPWAKE_API_KEY", None)
    started = time.monotonic()
    try:
        out = _make("compose-up", env, timeout=1200).stdout
        print(f"make compose-up: {time.monotonic() - started:.0f} s")
        url = re.search(r"OpenAI base URL: (\S+)", out)
        key = re.search(r"API key: (\S+)", out)
        token = re.search(r"admin token: (\S+)", out)
        assert url and key and token, out
        yield Compose(url.group(1), key.group(1), f"127.0.0.1:{env['SNAPWAKE_ADMIN_PORT']}", token.group(1))
    finally:
        _make("compose-down", env, timeout=300)
        left = {kind: _left(kind) for kind in ("container", "network", "volume")}
        assert left == {"container": [], "network": [], "volume": []}, left


def _instance_nodes(compose: Compose) -> dict[str, str]:
    # The admin port is TLS; cluster.sh made the CA in var/compose/pki (no client certificate)
    # and printed the operator's token, which the admin API requires.
    tls = ClientTls((ROOT / "var" / "compose" / "pki" / "ca.crt").read_bytes())
    with blocking_channel(compose.admin, tls, server_role="scheduler") as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        request = scheduler_pb2.ListInstancesRequest(function_id="default/default/demo")
        with pytest.raises(grpc.RpcError) as refused:  # no token: refused
            stub.ListInstances(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        got = stub.ListInstances(request, timeout=10, metadata=[("authorization", f"Bearer {compose.token}")])
    return {i.id: i.node for i in got.instances}


def test_compose_serves_the_demo_on_both_nodes(compose: Compose) -> None:
    client = openai.OpenAI(base_url=compose.base_url, api_key=compose.api_key, max_retries=0, timeout=120)

    def ask(_: int = 0) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=16)
        completion = raw.parse()
        assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens > 0
        return raw.headers["x-snapwake-instance"]

    served = {ask()}
    # The demo serves one request per instance at a time and keeps a standby on each node
    # (deploy-demo), so requests in flight together restore the other node's standby.
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            served |= set(pool.map(ask, range(2)))
            nodes = _instance_nodes(compose)
            if {nodes.get(i) for i in served} >= {"node-1", "node-2"}:
                break
    assert {nodes.get(i) for i in served} == {"node-1", "node-2"}, (served, nodes)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=compose.base_url, api_key="wrong", max_retries=0).models.list()
