"""Failover with real processes: two schedulers, two nodes, a gateway, runc containers.

Processes are killed for real (SIGKILL, or SIGTERM where a clean restart is the point) and
requests go through the gateway with the ``openai`` client. The tests share one cluster and
run in file order: the destructive ones (leader kill, restarts, node death) come last.

What a dead node means here: the whole machine is gone. Its nodeagent and blobstore get SIGKILL
and its containers are killed too (a crashed agent alone would leave its containers serving,
which hides the routing question); its etcd keys must then expire with its lease by themselves.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.nodeagent import probe
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import control_socket
from snapwake.devcluster import Cluster, ClusterConfig
from snapwake.testing import wait_for
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ELECTION_TTL_S = 2
NODE_LEASE_TTL_S = 3
SERVING = (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE)


# --- helpers ------------------------------------------------------------------------------

def _admin(cluster: Cluster, name: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(cluster.admin_channel(name))


def leader(cluster: Cluster, names: list[str] | None = None) -> str | None:
    """The process name of the scheduler that answers admin calls; followers say UNAVAILABLE
    "not the leader". None while no scheduler leads."""
    found = []
    for name in names or [n for n in cluster.names("scheduler") if n in cluster.procs]:
        try:
            _admin(cluster, name).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=2)
            found.append(name)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert len(found) <= 1, f"two schedulers answer as leader: {found}"
    return found[0] if found else None


def admin(cluster: Cluster) -> scheduler_pb2_grpc.SchedulerServiceStub:
    """The leader's admin stub (waits up to 20 s for an election)."""
    wait_for(lambda: leader(cluster) is not None, 20, "a scheduler leader", interval=0.2)
    return _admin(cluster, leader(cluster))  # type: ignore[arg-type]


def instances(cluster: Cluster, fid: str) -> list[types_pb2.Instance]:
    return list(admin(cluster).ListInstances(scheduler_pb2.ListInstancesRequest(function_id=fid), timeout=5).instances)


def deploy(cluster: Cluster, spec: types_pb2.FunctionSpec, timeout: float = 150) -> str:
    fid = f"{spec.tenant}/{spec.namespace}/{spec.name}"
    admin(cluster).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)

    def ready() -> bool:
        fn = admin(cluster).GetFunction(scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=5).function
        assert fn.state != types_pb2.FUNCTION_STATE_FAILED, fn.status_message
        return fn.state == types_pb2.FUNCTION_STATE_READY

    wait_for(ready, timeout, f"{fid} READY", interval=0.5)
    return fid


def spec(name: str, model_dir: Path, **policy: object) -> types_pb2.FunctionSpec:
    out = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                 model_dir=str(model_dir))
    for key, value in policy.items():
        if key.endswith("_s"):
            getattr(out.policy, key[:-2]).FromSeconds(int(value))  # type: ignore[call-overload]
        else:
            setattr(out.policy, key, value)
    return out


def client(cluster: Cluster, timeout: float = 90) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def ask(cluster: Cluster, model: str, max_tokens: int = 4) -> str:
    """One chat completion through the gateway; returns the instance id that served it."""
    raw = client(cluster).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens, temperature=0)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-snapwake-instance"]


def runc_ids(cluster: Cluster, agent: str) -> list[str]:
    out = subprocess.run(["runc", "--root", str(cluster.state_dir(agent) / "runc"), "list", "-q"],
                         capture_output=True, text=True, timeout=20)
    return out.stdout.split()


def kill_containers(cluster: Cluster, agent: str) -> None:
    root = str(cluster.state_dir(agent) / "runc")
    for cid in runc_ids(cluster, agent):
        subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True, timeout=20)
    # And their root dirs, which a dead machine's /run (a tmpfs) would lose too.
    shutil.rmtree(NodeAgentConfig(name=cluster.node_name(agent)).rootfs_base, ignore_errors=True)


def control_status(cluster: Cluster, inst: types_pb2.Instance) -> dict[str, object]:
    agent = next(a for a in cluster.names("nodeagent") if cluster.node_name(a) == inst.node)
    sock = control_socket(cluster.state_dir(agent) / "instances" / inst.id)
    return asyncio.run(probe.control(sock, {"op": "status"}, 5.0))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, demo_model_dir: Path) -> Iterator[Cluster]:
    import tempfile

    # Short: control and handover sockets live under it and Unix socket paths stay < 108 chars.
    var = Path(tempfile.mkdtemp(prefix="swf-", dir="/tmp"))
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                           etcd_port=0, node_name="n", schedulers=2, nodes=2,
                           extra_args={"scheduler": ["--election-ttl-s", str(ELECTION_TTL_S)],
                                       "nodeagent": ["--lease-ttl", str(NODE_LEASE_TTL_S)]})
    c = Cluster(config)
    try:
        c.start()
        deploy(c, spec("solo", demo_model_dir, snapshot_mode=types_pb2.SNAPSHOT_MODE_NONE, concurrency=1,
                       max_instances=1, min_instances=1, queue_timeout_s=90))
        deploy(c, spec("demo", demo_model_dir, min_instances=1, max_instances=2, standby_per_node=0,
                       queue_timeout_s=90))
        wait_for(lambda: all(any(i.state in SERVING for i in instances(c, f"default/default/{n}"))
                             for n in ("solo", "demo")), 90, "min_instances serving", interval=0.5)
        yield c
    finally:
        c.stop()
        for agent in c.names("nodeagent"):  # a SIGKILLed agent cannot clean up after itself
            kill_containers(c, agent)
        if request.session.testsfailed:
            print(f"\nfailover cluster kept for its logs: {var}/logs")
        else:
            import shutil
            shutil.rmtree(var, ignore_errors=True)


# --- tests -----------------------------------------------------------------------------

def test_burst_never_exceeds_instance_concurrency(cluster: Cluster) -> None:
    """20 requests at once against concurrency 1, max_instances 1: every one is answered and the
    model server never had two requests inside it (its own peak counter, read over the control
    socket, is the measure; not the scheduler's books)."""
    fid = "default/default/solo"
    (inst,) = [i for i in instances(cluster, fid) if i.state in SERVING]
    before = int(control_status(cluster, inst)["inflight_peak"])  # type: ignore[call-overload]
    assert before <= 1
    with ThreadPoolExecutor(20) as pool:
        served = list(pool.map(lambda _: ask(cluster, "solo", max_tokens=6), range(20)))
    assert set(served) == {inst.id}, served
    status = control_status(cluster, inst)
    assert status["inflight_peak"] == 1, status
    # The meter does see overlap: three requests straight at the instance, past the scheduler.
    body = {"model": "solo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: httpx.post(f"http://{inst.endpoint}/v1/chat/completions", json=body,
                                                   timeout=60).status_code, range(3)))
    assert codes == [200] * 3
    assert int(control_status(cluster, inst)["inflight_peak"]) >= 2  # type: ignore[call-overload]


class Stream:
    """Requests one after another on ``workers`` threads until stopped; records every outcome."""

    def __init__(self, cluster: Cluster, model: str, workers: int = 2) -> None:
        self.cluster, self.model = cluster, model
        self.served: list[tuple[float, str]] = []
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.served.append((time.monotonic(), ask(self.cluster, self.model)))
                self.slowest = max(self.slowest, time.monotonic() - began)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"{time.monotonic():.1f}: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def test_update_function_drains_old_revision_without_dropping(cluster: Cluster, demo_model_dir: Path) -> None:
    fid = "default/default/demo"
    old = {i.id for i in instances(cluster, fid) if i.revision == 1}
    assert old
    new_spec = spec("demo", demo_model_dir, min_instances=1, max_instances=2, standby_per_node=0,
                    queue_timeout_s=90)
    new_spec.env["TEST_REVISION"] = "2"  # any change makes a revision; SNAPWAKE_* keys are the platform's
    with Stream(cluster, "demo") as stream:
        wait_for(lambda: len(stream.served) >= 4, 60, "requests flowing before the update", interval=0.2)
        fn = admin(cluster).UpdateFunction(scheduler_pb2.UpdateFunctionRequest(spec=new_spec), timeout=10).function
        assert fn.revision == 2
        updated_at = time.monotonic()

        def switched() -> bool:
            now = instances(cluster, fid)
            rev2 = {i.id for i in now if i.revision == 2 and i.state in SERVING}
            old_left = [i for i in now if i.id in old and i.state not in (InstanceState.INSTANCE_STATE_ENDED,)]
            recent = [iid for at, iid in stream.served[-4:] if at > updated_at]
            return bool(rev2) and not old_left and len(recent) == 4 and set(recent) <= rev2

        wait_for(switched, 150, "revision 2 serving and revision 1 drained", interval=0.5)
    assert not stream.failures, stream.failures
    print(f"update: {len(stream.served)} requests, none failed, slowest {stream.slowest:.2f}s")
    snap = admin(cluster).ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=fid), timeout=5).snapshots
    assert {s.revision for s in snap if s.state == types_pb2.SNAPSHOT_STATE_READY} >= {1, 2}
    # The old revision kept serving while revision 2's snapshot was built: no stall, no gap.
    assert any(iid in old for at, iid in stream.served if at > updated_at + 2), "old revision did not bridge"
    assert stream.slowest < 10, f"a request waited {stream.slowest:.1f}s during the rollout"


def test_leader_killed_standby_takes_over(cluster: Cluster) -> None:
    before = [f.id for f in admin(cluster).ListFunctions(scheduler_pb2.ListFunctionsRequest(), timeout=5).functions]
    solo = ask(cluster, "solo")
    old = leader(cluster)
    assert old is not None
    (other,) = [n for n in cluster.names("scheduler") if n != old]
    assert leader(cluster, [other]) is None  # the standby refuses admin calls
    killed_at = time.monotonic()
    cluster.stop_service(old, signal.SIGKILL)
    # A request sent into the gap waits for the new leader instead of failing.
    with ThreadPoolExecutor(1) as pool:
        in_gap = pool.submit(ask, cluster, "solo")
        wait_for(lambda: leader(cluster, [other]) == other, 20, f"{other} elected", interval=0.1)
        elected_s = time.monotonic() - killed_at
        assert in_gap.result(timeout=60) == solo
    served_s = time.monotonic() - killed_at
    assert elected_s < ELECTION_TTL_S + 5, f"takeover took {elected_s:.1f}s"
    assert served_s < 15, f"first request after the kill took {served_s:.1f}s"
    after = [f.id for f in admin(cluster).ListFunctions(scheduler_pb2.ListFunctionsRequest(), timeout=5).functions]
    assert after == before
    # The new leader adopted the running instance: nothing was restarted.
    assert ask(cluster, "solo") == solo
    print(f"leader {old} killed: {other} elected after {elected_s:.2f}s, gateway served after {served_s:.2f}s")
    cluster.start_service(old)  # back as a standby
    assert leader(cluster) == other


def test_gateway_and_schedulers_restart_lose_nothing(cluster: Cluster) -> None:
    models = lambda: sorted(m.id for m in client(cluster).models.list())  # noqa: E731
    before = models()
    assert {"solo", "demo"} <= set(before)
    cluster.stop_service("gateway")
    cluster.start_service("gateway")
    assert models() == before
    for name in cluster.names("scheduler"):  # every scheduler down at once: only etcd remembers
        cluster.stop_service(name)
    for name in cluster.names("scheduler"):
        cluster.start_service(name)
    wait_for(lambda: leader(cluster) is not None, 20, "a leader after the restart", interval=0.2)
    assert models() == before
    assert ask(cluster, "solo") and ask(cluster, "demo")


def test_dead_node_keys_expire_and_requests_move(cluster: Cluster) -> None:
    fid = "default/default/solo"
    (inst,) = [i for i in instances(cluster, fid) if i.state in SERVING]
    agent = next(a for a in cluster.names("nodeagent") if cluster.node_name(a) == inst.node)
    blob = agent.replace("nodeagent", "blobstore")
    survivor = next(cluster.node_name(a) for a in cluster.names("nodeagent") if a != agent)
    killed_at = time.monotonic()
    cluster.stop_service(agent, signal.SIGKILL)
    cluster.stop_service(blob, signal.SIGKILL)
    kill_containers(cluster, agent)
    with ThreadPoolExecutor(1) as pool:
        # Sent before the keys expire: the gateway finds the instance dead and tries again.
        moved = pool.submit(ask, cluster, "solo")

        def expired() -> bool:
            nodes = [n.name for n in admin(cluster).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5).nodes]
            on_dead = [i.id for i in instances(cluster, "") if i.node == inst.node]
            return inst.node not in nodes and not on_dead

        wait_for(expired, NODE_LEASE_TTL_S + 10, f"{inst.node}'s keys expiring", interval=0.1)
        expired_s = time.monotonic() - killed_at
        served_by = moved.result(timeout=90)
    assert expired_s < NODE_LEASE_TTL_S + 3, f"keys lived {expired_s:.1f}s after the kill"
    by_id = {i.id: i for i in instances(cluster, fid)}
    assert served_by != inst.id and by_id[served_by].node == survivor
    assert by_id[ask(cluster, "solo")].node == survivor
    print(f"node {inst.node} killed: keys gone after {expired_s:.2f}s; served by {survivor}")
