"""etcd as a real three-member cluster under the whole platform: real etcd processes, real
service processes (``snapwake.devcluster.Cluster``), runc containers, the demo model, and the
``openai`` client with its retries off (``max_retries=0``), so every failure counts.

The tests share one cluster and run in file order, the most destructive last:

1. one etcd member (the raft leader) is killed under steady load: nothing is lost;
2. an operator drains a node from the CLI under steady load: its instances move, nothing is lost;
3. a node is cut off from etcd (its etcd traffic goes through ``TcpProxy``, which the test cuts):
   it fences itself within its lease TTL and rejoins when the partition heals;
4. the scheduler leader is cut off from etcd the same way (not killed): it stops granting claims
   by its own clock before the standby is elected and starts;
5. two members are killed, so etcd has no quorum: requests in flight complete, new requests
   get 503 with Retry-After within the documented bound, a deploy fails with a clear
   UNAVAILABLE, and everything recovers once the members are back.

The bound checked in 5 (README, "etcd as a cluster"): the leader steps down within
``election_ttl_s`` of its last refresh; a gateway then answers a request 503 after at most
``rpc_timeout`` (its function list, read from etcd, times out; the last one is used) plus
``leader_wait`` (no scheduler leads), and at once after that.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from tcp_proxy import TcpProxy

from snapwake import cli
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.pki import Identity
from snapwake.testing import EtcdCluster, wait_for
from snapwake.v1 import nodeagent_pb2, nodeagent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ELECTION_TTL_S = 3
NODE_LEASE_TTL_S = 4
RPC_TIMEOUT_S = 2.0
LEADER_WAIT_S = 4.0
# What the quorum-loss test allows for process scheduling on a loaded two-core machine.
SLACK_S = 3.0
FID = "default/default/demo"
SERVING = (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE)
GONE = (InstanceState.INSTANCE_STATE_STOPPING, InstanceState.INSTANCE_STATE_ENDED, InstanceState.INSTANCE_STATE_FAILED)
# Cut off in tests 3 and 4: each has its own proxies, one per member.
PARTITIONED = ("nodeagent-1", "scheduler-1")


@dataclass
class Setup:
    cluster: Cluster
    etcd: EtcdCluster
    proxies: dict[str, list[TcpProxy]]

    def cut(self, name: str) -> None:
        for proxy in self.proxies[name]:
            proxy.cut()

    def heal(self, name: str) -> None:
        for proxy in self.proxies[name]:
            proxy.heal()


# --- helpers ------------------------------------------------------------------------------

def _admin(cluster: Cluster, name: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(cluster.admin_channel(name))


def leader(cluster: Cluster) -> str | None:
    """The scheduler process that answers admin calls (None while none does)."""
    found = []
    for name in cluster.names("scheduler"):
        try:
            _admin(cluster, name).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=3)
            found.append(name)
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err
    assert len(found) <= 1, f"two schedulers answer as leader: {found}"
    return found[0] if found else None


def admin(cluster: Cluster) -> scheduler_pb2_grpc.SchedulerServiceStub:
    wait_for(lambda: leader(cluster) is not None, 30, "a scheduler leader", interval=0.2)
    return _admin(cluster, leader(cluster))  # type: ignore[arg-type]


def instances(cluster: Cluster) -> list[types_pb2.Instance]:
    return list(admin(cluster).ListInstances(scheduler_pb2.ListInstancesRequest(function_id=FID), timeout=5).instances)


def on_node(cluster: Cluster, node: str, *states: int) -> list[types_pb2.Instance]:
    return [i for i in instances(cluster) if i.node == node and (not states or i.state in states)]


def client(cluster: Cluster, timeout: float = 200) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def ask(cluster: Cluster, max_tokens: int = 4) -> str:
    """One chat completion through the gateway; returns the instance id that served it."""
    raw = client(cluster).chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens, temperature=0)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-snapwake-instance"]


def etcd_leader(etcd: EtcdCluster) -> int:
    """Index of the member that is etcd's raft leader."""
    out = subprocess.run(["etcdctl", "--endpoints", ",".join(etcd.endpoints), "endpoint", "status", "-w", "json"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    for status in json.loads(out):
        if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
            return etcd.endpoints.index(status["Endpoint"].removeprefix("http://"))
    raise AssertionError(f"no etcd leader in {out}")


def log_times(cluster: Cluster, name: str, pattern: str) -> list[float]:
    """Unix times of the lines of ``name``'s log that match ``pattern``."""
    found = []
    for line in (cluster.config.var_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            found.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return found


def node_call(cluster: Cluster, agent: str) -> grpc.StatusCode:
    """What the nodeagent answers a start it must refuse: INVALID_ARGUMENT while it takes work,
    UNAVAILABLE naming the fence while fenced."""
    stub = nodeagent_pb2_grpc.NodeAgentServiceStub(cluster.channel_as(agent, Identity("scheduler", "scheduler")))
    try:
        stub.StartInstance(nodeagent_pb2.StartInstanceRequest(), timeout=5)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            assert "fenced" in (err.details() or ""), err
        return err.code()  # type: ignore[no-any-return]
    raise AssertionError("an empty StartInstance was accepted")


class Stream:
    """Requests one after another on ``workers`` threads until stopped; records every outcome."""

    def __init__(self, cluster: Cluster, workers: int = 2) -> None:
        self.cluster = cluster
        self.served: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.served.append((time.monotonic(), ask(self.cluster)))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"{time.monotonic():.1f}: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        wait_for(lambda: len(self.served) >= 4 or bool(self.failures), 60, "requests flowing", interval=0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def _deploy(cluster: Cluster, model_dir: Path) -> None:
    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="demo", image="builtin",
                                  model_dir=str(model_dir))
    # No snapshot: a deploy here costs one container start, not a snapshot build and standbys
    # (the rejoin of a parked standby is covered in tests/unit/test_nodeagent_operations.py).
    spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_NONE
    spec.policy.min_instances, spec.policy.max_instances = 1, 2
    spec.policy.concurrency = 4
    spec.policy.queue_timeout.FromSeconds(180)  # a start on a loaded two-core machine: up to a minute
    admin(cluster).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)

    def ready() -> bool:
        fn = admin(cluster).GetFunction(scheduler_pb2.GetFunctionRequest(function_id=FID), timeout=5).function
        assert fn.state != types_pb2.FUNCTION_STATE_FAILED, fn.status_message
        return fn.state == types_pb2.FUNCTION_STATE_READY and any(i.state in SERVING for i in instances(cluster))

    wait_for(ready, 180, f"{FID} READY and serving", interval=0.5)


def _kill_containers(cluster: Cluster) -> None:
    for agent in cluster.names("nodeagent"):
        root = str(cluster.state_dir(agent) / "runc")
        ids = subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True, text=True, timeout=20)
        for cid in ids.stdout.split():
            subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest, demo_model_dir: Path) -> Iterator[Setup]:
    # Short: control and handover sockets live under it and Unix socket paths stay < 108 chars.
    var = Path(tempfile.mkdtemp(prefix="swe-", dir="/tmp"))
    etcd = EtcdCluster(var / "etcd")
    proxies = {name: [TcpProxy(e) for e in etcd.endpoints] for name in PARTITIONED}
    # Processes of one kind share its flags; a named process adds its own (its --etcd wins).
    config = ClusterConfig(
        var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0, etcd_port=0,
        node_name="n", schedulers=2, nodes=2, etcd_endpoints=etcd.endpoints,
        extra_args={"scheduler": ["--election-ttl-s", str(ELECTION_TTL_S)],
                    "nodeagent": ["--lease-ttl", str(NODE_LEASE_TTL_S), "--fence-drain-s", "10"],
                    "gateway": ["--rpc-timeout", str(RPC_TIMEOUT_S), "--leader-wait", str(LEADER_WAIT_S)]})
    cluster = Cluster(config)
    try:
        etcd.start()
        for name, group in proxies.items():
            config.extra_args[name] = ["--etcd", ",".join(p.start().address for p in group)]
        cluster.start()
        # The first instance lands on node "n" (the other is cordoned meanwhile): the drain test
        # moves it to "n-1", where the fence test finds it.
        other = cluster.node_name("nodeagent-1")
        admin(cluster).CordonNode(scheduler_pb2.CordonNodeRequest(node=other, reason="setup"), timeout=10)
        _deploy(cluster, demo_model_dir)
        admin(cluster).UncordonNode(scheduler_pb2.UncordonNodeRequest(node=other), timeout=10)
        yield Setup(cluster, etcd, proxies)
    finally:
        cluster.stop()
        _kill_containers(cluster)  # a fenced or killed agent may leave some behind
        for group in proxies.values():
            for proxy in group:
                proxy.stop()
        etcd.stop()
        if request.session.testsfailed:
            print(f"\netcd cluster test kept for its logs: {var}/logs, {var}/etcd")
        else:
            import shutil
            shutil.rmtree(var, ignore_errors=True)


# --- tests -----------------------------------------------------------------------------

def test_one_member_killed_under_steady_load_loses_nothing(setup: Setup) -> None:
    cluster, etcd = setup.cluster, setup.etcd
    victim = etcd.members[etcd_leader(etcd)]  # the raft leader: its followers must elect anew
    with Stream(cluster) as stream:
        before = len(stream.served)
        victim.kill()
        killed = time.monotonic()
        wait_for(lambda: len(stream.served) >= before + 10 and time.monotonic() - killed > 6, 60,
                 "requests served with a member down", interval=0.2)
        victim.spawn()
        victim.wait_ready()
        back = len(stream.served)
        wait_for(lambda: len(stream.served) >= back + 6, 60, "requests served with the member back", interval=0.2)
    assert stream.failures == []
    assert leader(cluster) is not None
    print(f"one member killed: {len(stream.served)} requests, none failed")


def test_drain_from_the_cli_moves_instances_off_a_node_under_load(setup: Setup, capsys: pytest.CaptureFixture[str]
                                                                   ) -> None:
    cluster = setup.cluster
    drained, kept = cluster.node_name("nodeagent"), cluster.node_name("nodeagent-1")
    schedulers = ",".join(cluster.scheduler_addresses)
    moved = {i.id for i in on_node(cluster, drained, *SERVING)}
    assert moved and not on_node(cluster, kept, *SERVING)
    with Stream(cluster) as stream:
        began = time.monotonic()
        code = cli.main(["--scheduler", schedulers, *cluster.cli_args(), "node", "drain", drained, "--reason", "test",
                         "--wait-timeout", "200"])
        out, err = capsys.readouterr()
        assert (code, out) == (0, f"node {drained} drained\n"), err
        drain_s = time.monotonic() - began
        wait_for(lambda: bool(stream.served) and stream.served[-1][0] > began + drain_s + 1, 30,
                 "requests after the drain", interval=0.2)
    assert stream.failures == []
    assert [i.id for i in on_node(cluster, drained) if i.state not in GONE] == []
    live = {i.id: i for i in instances(cluster)}
    assert {live[iid].node for at, iid in stream.served[-3:]} == {kept}
    assert any(iid in moved for at, iid in stream.served if at < began + drain_s)  # served until drained
    code = cli.main(["--scheduler", schedulers, *cluster.cli_args(), "nodes"])
    out, _ = capsys.readouterr()
    assert code == 0 and re.search(rf"^{drained}\s+Draining \(test\)", out, re.M), out
    assert cli.main(["--scheduler", schedulers, *cluster.cli_args(), "node", "uncordon", drained]) == 0
    code = cli.main(["--scheduler", schedulers, *cluster.cli_args(), "nodes"])
    out, _ = capsys.readouterr()
    assert code == 0 and re.search(rf"^{drained}\s+Ready", out, re.M), out
    print(f"drained {drained} in {drain_s:.1f}s under load: {len(stream.served)} requests, none failed")


def test_a_node_cut_off_from_etcd_fences_itself_then_rejoins(setup: Setup) -> None:
    cluster, agent = setup.cluster, "nodeagent-1"
    node = cluster.node_name(agent)
    serving = [i.id for i in on_node(cluster, node, *SERVING)]
    assert serving, f"the drain left no serving instance on {node}"
    assert node_call(cluster, agent) == grpc.StatusCode.INVALID_ARGUMENT
    with Stream(cluster) as stream:
        setup.cut(agent)
        cut = time.monotonic()
        wait_for(lambda: node_call(cluster, agent) == grpc.StatusCode.UNAVAILABLE, NODE_LEASE_TTL_S + 5,
                 f"{node} fenced", interval=0.1)
        fenced_s = time.monotonic() - cut
        # Its serving instances end (their GPUs freed); its keys expire; work moves to the other node.
        wait_for(lambda: not any(i.node == node for i in instances(cluster)), NODE_LEASE_TTL_S + 10,
                 f"{node}'s keys gone", interval=0.2)
        wait_for(lambda: len(stream.served) > 4 and stream.served[-1][0] > cut + NODE_LEASE_TTL_S + 2, 180,
                 "requests served by the other node", interval=0.2)
        setup.heal(agent)
        healed = time.monotonic()
        wait_for(lambda: node_call(cluster, agent) == grpc.StatusCode.INVALID_ARGUMENT, 30,
                 f"{node} serving again", interval=0.2)
        rejoined_s = time.monotonic() - healed
    nodes = admin(cluster).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5).nodes
    assert node in [n.name for n in nodes]
    agent_side = nodeagent_pb2_grpc.NodeAgentServiceStub(cluster.channel_as(agent, Identity("scheduler", "scheduler"))).ListInstances(
        nodeagent_pb2.NodeAgentServiceListInstancesRequest(), timeout=5).instances
    assert all(i.state not in SERVING for i in agent_side if i.id in serving)  # stopped while fenced
    # What etcd holds of the node after it rejoined is what the node runs, nothing older.
    ours = {i.id: i.state for i in agent_side}
    assert all(ours.get(i.id) == i.state for i in on_node(cluster, node))
    assert fenced_s <= NODE_LEASE_TTL_S, f"fenced {fenced_s:.1f}s after the cut"
    print(f"node {node} cut off: fenced after {fenced_s:.2f}s, rejoined {rejoined_s:.2f}s after the heal; "
          f"{len(stream.served)} requests served, {len(stream.failures)} failed: {stream.failures[:3]}")
    assert stream.failures == []


def _grants(ch: grpc.Channel, stop: threading.Event, out: list[float]) -> None:
    """AcquireClaim (then ReleaseClaim) on one scheduler as fast as it answers; notes each grant."""
    stub = scheduler_pb2_grpc.ClaimServiceStub(ch)
    while not stop.is_set():
        try:
            got = stub.AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id=FID, gateway_id="probe",
                                                                      request_id="probe"), timeout=1)
        except grpc.RpcError:
            time.sleep(0.02)
            continue
        out.append(time.monotonic())
        with contextlib.suppress(grpc.RpcError):
            stub.ReleaseClaim(scheduler_pb2.ReleaseClaimRequest(claim_id=got.claim_id, gateway_id="probe"), timeout=2)


def test_a_leader_cut_off_from_etcd_stops_granting_before_the_next_one_starts(setup: Setup) -> None:
    cluster = setup.cluster
    old, new = "scheduler-1", "scheduler"  # only the second one's etcd traffic can be cut
    if leader(cluster) != old:  # make it lead: the other resigns and comes back as a standby
        cluster.stop_service(new)
        wait_for(lambda: leader(cluster) == old, 30, f"{old} elected", interval=0.2)
        cluster.start_service(new)
    granted: dict[str, list[float]] = {old: [], new: []}
    stop = threading.Event()
    probes = [threading.Thread(target=_grants, args=(cluster.channel_as(n, Identity("gateway", "probe")), stop, granted[n]), daemon=True)
              for n in (old, new)]
    for probe in probes:
        probe.start()
    try:
        wait_for(lambda: len(granted[old]) >= 3, 30, f"{old} granting", interval=0.1)
        setup.cut(old)
        cut, cut_wall = time.monotonic(), time.time()
        wait_for(lambda: bool(granted[new]), 40, f"{new} granting", interval=0.1)
    finally:
        stop.set()
        for probe in probes:
            probe.join(10)
        setup.heal(old)
    last_old, first_new = max(granted[old]), min(granted[new])
    assert last_old < first_new, "two schedulers granted claims at once"
    assert last_old - cut <= ELECTION_TTL_S, f"{old} granted {last_old - cut:.2f}s after the cut"
    # Each side's own account, from its log: the old one stepped down (by its own clock, within
    # the lease TTL of the cut) before the new one was elected.
    stepped = [t for t in log_times(cluster, old, r"stepped down as") if t >= cut_wall]
    elected = [t for t in log_times(cluster, new, r"elected leader as") if t >= cut_wall]
    assert stepped and elected and stepped[0] < elected[0], (stepped, elected)
    assert stepped[0] - cut_wall <= ELECTION_TTL_S
    wait_for(lambda: leader(cluster) == new, 30, f"{new} leading with {old} back as a standby", interval=0.2)
    print(f"leader partitioned: last grant {last_old - cut:.2f}s after the cut, stepped down after "
          f"{stepped[0] - cut_wall:.2f}s; {new} elected after {elected[0] - cut_wall:.2f}s, first grant after "
          f"{first_new - cut:.2f}s")


def _in_flight(cluster: Cluster, started: threading.Event) -> tuple[int, str | None, int]:
    """A streamed completion long enough to be in flight when etcd loses quorum."""
    chunks, reason = 0, None
    stream = client(cluster).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=160,
        temperature=0, stream=True)
    for chunk in stream:
        started.set()
        chunks += 1
        reason = chunk.choices[0].finish_reason if chunk.choices else reason
    return chunks, reason, 200


def _probe(cluster: Cluster) -> tuple[float, int, str | None, str]:
    began = time.monotonic()
    r = httpx.post(cluster.gateway_url + "/v1/chat/completions", timeout=60,
                   json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return time.monotonic() - began, r.status_code, r.headers.get("retry-after"), r.text[:300]


def test_quorum_loss_fails_new_requests_with_503_within_the_bound_then_recovers(
        setup: Setup, capsys: pytest.CaptureFixture[str], demo_model_dir: Path) -> None:
    cluster, etcd = setup.cluster, setup.etcd
    assert ask(cluster)  # warm
    bound = ELECTION_TTL_S + RPC_TIMEOUT_S + LEADER_WAIT_S + SLACK_S
    started = [threading.Event() for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(_in_flight, cluster, s) for s in started]
        for s in started:
            assert s.wait(60)
        etcd.members[1].kill()
        etcd.members[2].kill()
        lost, lost_wall = time.monotonic(), time.time()
        finished = [f.result(timeout=120) for f in in_flight]
    assert all(reason in ("length", "stop") and code == 200 for _, reason, code in finished), finished

    # New requests: each is answered, never hangs; from lost + bound on, every one is a 503
    # carrying Retry-After.
    probes = []
    while time.monotonic() - lost < bound + 4:
        probes.append((time.monotonic() - lost, *_probe(cluster)))
    for at, took, status, retry_after, body in probes:
        assert status in (200, 503), (at, status, body)
        assert took <= bound, f"a request sent {at:.1f}s after the loss took {took:.1f}s: {body}"
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1, body
    first_503 = next(at + took for at, took, status, *_ in probes if status == 503)
    assert first_503 <= bound, f"first 503 came {first_503:.1f}s after the loss"
    assert all(status == 503 for at, _, status, *_ in probes if at > first_503)
    assert re.search(r"leader|etcd", probes[-1][4]), probes[-1][4]

    # Deploys (and any admin write) fail with a clear UNAVAILABLE too, within the bound.
    began = time.monotonic()
    code = cli.main(["--scheduler", ",".join(cluster.scheduler_addresses), *cluster.cli_args(), "--timeout", "8", "deploy",
                     "--name", "late", "--model-dir", str(demo_model_dir)])
    _, err = capsys.readouterr()
    assert code == 5 and re.search(r"Unavailable: .*(leader|etcd)", err), err
    assert time.monotonic() - began < 20

    for member in etcd.members[1:]:
        member.spawn()
    back = time.monotonic()
    wait_for(lambda: _probe(cluster)[1] == 200, 180, "requests served again", interval=0.5)
    recovered_s = time.monotonic() - back
    with Stream(cluster) as stream:
        wait_for(lambda: len(stream.served) >= 6, 60, "steady requests again", interval=0.2)
    assert stream.failures == []
    assert leader(cluster) is not None
    nodes = {n.name for n in admin(cluster).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5).nodes}
    assert nodes == {cluster.node_name(a) for a in cluster.names("nodeagent")}
    steps = log_times(cluster, leader(cluster) or "scheduler", r"stepped down as")
    print(f"quorum lost: first 503 {first_503:.1f}s after (bound {bound:.0f}s), {len(probes)} probes; "
          f"in flight {[c for c, _, _ in finished]} chunks completed; recovered {recovered_s:.1f}s after the "
          f"members came back; step-downs logged {[round(t - lost_wall, 1) for t in steps if t >= lost_wall]}")
