"""Nodes on separate hosts, for real: each node (nodeagent, blobstore and its runc containers)
in a network namespace of its own, the control plane (etcd, scheduler, gateway) in another, all
cabled to a private bridge (``tests/netns.py``). Nothing listens on or dials a loopback address
across hosts: nodes listen on every address and advertise their own, the scheduler dials those,
the gateway dials each instance's forwarder on its node's address, and blobstores find each
other through etcd (no ``--peers``).

The tests share one cluster and run in file order: a request across hosts; node 2 joins and
gets the snapshot node 1 built from node 1's blobstore; node 1's cable is cut under traffic.
The test process reaches the hosts over a cable of its own (``Network.launcher_address``) and
sends traffic nowhere else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from netns import Network

from services.nodeagent.config import NodeAgentConfig
from snapwake.devcluster import Cluster, ClusterConfig, Host
from snapwake.pki import Identity
from snapwake.testing import wait_for
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LEASE_TTL_S = 3
DEAD_NODE_S = 3  # the gateway's --dead-node-timeout
FID = "default/default/demo"
SERVING = (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE)


def admin(cluster: Cluster) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(cluster.admin_channel())


def instances(cluster: Cluster) -> list[types_pb2.Instance]:
    return list(admin(cluster).ListInstances(scheduler_pb2.ListInstancesRequest(function_id=FID), timeout=5).instances)


def nodes(cluster: Cluster) -> dict[str, types_pb2.Node]:
    return {n.name: n for n in admin(cluster).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5).nodes}


def snapshot(cluster: Cluster) -> types_pb2.Snapshot:
    (snap,) = admin(cluster).ListSnapshots(scheduler_pb2.ListSnapshotsRequest(function_id=FID), timeout=5).snapshots
    return snap


def client(cluster: Cluster) -> openai.OpenAI:
    # Bounded: a request the gateway never answered fails the test as a timeout.
    return openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def remove_containers(cluster: Cluster, agent: str) -> None:
    """What a node that could not stop cleanly left behind: its runc containers and root dirs."""
    root = str(cluster.state_dir(agent) / "runc")
    out = subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True, text=True, timeout=20)
    for cid in out.stdout.split():
        subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True, timeout=20)
    shutil.rmtree(NodeAgentConfig(name=cluster.node_name(agent)).rootfs_base, ignore_errors=True)


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    network = Network(["cp", "n1", "n2"]).open()
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, net: Network, demo_model_dir: Path) -> Iterator[Cluster]:
    """The control plane and node 1 up, the demo function deployed (snapshot built on node 1,
    one instance serving there); node 2 is configured and joins in its test."""
    var = Path(tempfile.mkdtemp(prefix="swh-", dir="/tmp"))  # short: Unix socket paths live under it
    cp = Host(net.addresses["cp"], netns=net.netns("cp"))

    def node(host: str) -> Host:
        return Host(net.addresses[host], listen="0.0.0.0", netns=net.netns(host))

    config = ClusterConfig(
        var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0, etcd_port=0,
        node_name=net.tag, nodes=2, static_peers=False,
        hosts={"etcd": cp, "scheduler": cp, "gateway": cp, "nodeagent": node("n1"), "blobstore": node("n1"),
               "nodeagent-1": node("n2"), "blobstore-1": node("n2")},
        extra_args={"nodeagent": ["--lease-ttl", str(LEASE_TTL_S)],
                    "gateway": ["--connect-timeout", "2", "--dead-node-timeout", str(DEAD_NODE_S)]})
    c = Cluster(config)
    up = False
    try:
        var.mkdir(exist_ok=True)
        c.issue_certificates()
        c.start_etcd()
        for name in ("blobstore", "nodeagent", "scheduler", "gateway"):
            c.start_service(name)
        spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="demo", image="builtin",
                                      model_dir=str(demo_model_dir))
        spec.policy.min_instances, spec.policy.max_instances = 1, 2
        spec.policy.standby_per_node, spec.policy.concurrency = 1, 4
        spec.policy.queue_timeout.FromSeconds(90)
        admin(c).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)

        def ready() -> bool:
            fn = admin(c).GetFunction(scheduler_pb2.GetFunctionRequest(function_id=FID), timeout=5).function
            assert fn.state != types_pb2.FUNCTION_STATE_FAILED, fn.status_message
            return fn.state == types_pb2.FUNCTION_STATE_READY and any(i.state in SERVING for i in instances(c))

        wait_for(ready, 150, "demo READY and serving on node 1", interval=0.5)
        up = True
        yield c
    finally:
        for host in ("n1", "n2"):  # a node stops cleanly only while it reaches etcd
            net.mend(host)
        c.stop()
        for agent in c.names("nodeagent"):
            remove_containers(c, agent)
        if request.session.testsfailed or not up:
            print(f"\nmultihost cluster kept for its logs: {var}/logs")
        else:
            shutil.rmtree(var, ignore_errors=True)


def test_request_is_served_across_hosts(cluster: Cluster, net: Network) -> None:
    node1 = cluster.node_name("nodeagent")
    (inst,) = [i for i in instances(cluster) if i.state in SERVING]
    assert inst.node == node1
    # Every address in etcd is node 1's own, routable one: none is loopback or a wildcard.
    record = nodes(cluster)[node1]
    assert record.address == f"{net.addresses['n1']}:{cluster.ports['nodeagent']}"
    assert record.blobstore_address == f"{net.addresses['n1']}:{cluster.ports['blobstore']}"
    assert inst.endpoint.rpartition(":")[0] == net.addresses["n1"]
    # The gateway and the node really are on different hosts.
    assert netns_of(cluster.procs["gateway"].pid) != netns_of(cluster.procs["nodeagent"].pid)

    raw = client(cluster).chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-snapwake-instance"] == inst.id


def test_snapshot_built_on_node_1_reaches_node_2_by_peer_fetch(cluster: Cluster, net: Network) -> None:
    node1, node2 = cluster.node_name("nodeagent"), cluster.node_name("nodeagent-1")
    snap = snapshot(cluster)
    assert snap.state == types_pb2.SNAPSHOT_STATE_READY and list(snap.disk_nodes) == [node1]
    cluster.start_service("blobstore-1")
    cluster.start_service("nodeagent-1")
    assert "--peers" not in list(cluster.procs["blobstore-1"].args)  # type: ignore[arg-type]
    # Node 2 gets a standby of its own, which needs the snapshot in its blobstore's cache.
    wait_for(lambda: any(i.node == node2 and i.state == InstanceState.INSTANCE_STATE_STANDBY
                         for i in instances(cluster)), 120, "a standby on node 2", interval=0.5)
    sid = f"{FID}@{snap.revision}"
    with cluster.channel_as("blobstore-1", Identity("nodeagent", cluster.node_name("blobstore-1"))) as ch:
        stat = blobstore_pb2_grpc.BlobstoreServiceStub(ch).StatSnapshot(
            blobstore_pb2.StatSnapshotRequest(snapshot_id=sid), timeout=10)
    assert stat.on_disk and stat.in_cache and stat.manifest_digest == snap.manifest_digest
    assert sorted(snapshot(cluster).disk_nodes) == sorted([node1, node2])
    log = (cluster.config.var_dir / "logs" / "blobstore-1.log").read_text()
    assert f"fetched {sid} from peer {cluster.address('blobstore')}" in log


@dataclass
class Outcome:
    """One request of the traffic: when it ran, who served it, how it ended."""

    began: float
    ended: float
    stream: bool
    instance: str = ""  # from x-snapwake-instance, when the answer's headers came
    error: BaseException | None = None


class Traffic:
    """Requests back to back on ``workers`` threads (streaming and not, alternately) until stopped."""

    def __init__(self, cluster: Cluster, workers: int = 3) -> None:
        self.client, self.workers = client(cluster), workers
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(workers)]

    def _one(self, stream: bool) -> Outcome:
        out = Outcome(time.monotonic(), 0.0, stream)
        kwargs = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}],
                  "max_tokens": 24, "temperature": 0}
        try:
            if stream:
                with self.client.chat.completions.with_streaming_response.create(**kwargs, stream=True) as resp:
                    out.instance = resp.headers.get("x-snapwake-instance", "")
                    assert any(c.choices and c.choices[0].delta.content for c in resp.parse())
            else:
                raw = self.client.chat.completions.with_raw_response.create(**kwargs)
                out.instance = raw.headers.get("x-snapwake-instance", "")
                assert raw.parse().choices[0].message.content
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, judged below
            out.error = exc
        out.ended = time.monotonic()
        return out

    def _run(self, stream: bool) -> None:
        while not self._stop.is_set():
            self.outcomes.append(self._one(stream))

    def served_by(self, ids: set[str], after: float) -> int:
        return sum(1 for o in self.outcomes if o.error is None and o.instance in ids and o.began > after)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def clean_error(exc: BaseException) -> bool:
    """An answer the gateway gave on purpose: an HTTP error status with an OpenAI error body, or
    a stream that ended with an OpenAI error event. Never a timeout or a dropped connection."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 and isinstance(exc.body, dict) and bool(exc.body.get("message"))
    return type(exc) is openai.APIError and "mid-stream" in str(exc)


def test_cut_link_expires_node_1_and_moves_its_traffic(cluster: Cluster, net: Network) -> None:
    node1, node2 = cluster.node_name("nodeagent"), cluster.node_name("nodeagent-1")
    (inst,) = [i for i in instances(cluster) if i.state in SERVING]
    assert inst.node == node1
    with Traffic(cluster) as traffic:
        wait_for(lambda: traffic.served_by({inst.id}, 0) >= 6, 60, "traffic on node 1", interval=0.1)
        cut_at = time.monotonic()
        net.cut("n1")  # node 1's processes and containers run on; its packets go nowhere

        def expired() -> bool:
            return node1 not in nodes(cluster) and not [i for i in instances(cluster) if i.node == node1]

        wait_for(expired, LEASE_TTL_S + 10, "node 1's keys expiring", interval=0.1)
        expired_s = time.monotonic() - cut_at

        def moved() -> bool:
            on_node2 = {i.id for i in instances(cluster) if i.node == node2}
            return traffic.served_by(on_node2, cut_at + expired_s) >= 6  # begun once node 1 was gone

        wait_for(moved, 90, "traffic on node 2", interval=0.2)
    outcomes = traffic.outcomes
    failed = [o for o in outcomes if o.error is not None]
    report = [f"{o.began - cut_at:+.1f}s..{o.ended - cut_at:+.1f}s stream={o.stream} {o.instance or '-'}: "
              f"{type(o.error).__name__}: {o.error}" for o in failed]
    # Only requests in flight on node 1 when its cable went may fail, and only cleanly (a
    # non-streaming one is usually retried on node 2 and succeeds).
    assert all(o.began < cut_at and o.instance in ("", inst.id) for o in failed), report
    assert all(o.error is not None and clean_error(o.error) for o in failed), report
    assert len(failed) <= traffic.workers, report
    # None hung: the slowest waited for the dead node to be noticed, then for node 2.
    slowest = max(o.ended - o.began for o in outcomes)
    assert slowest < 45, f"a request took {slowest:.1f}s"
    assert expired_s < LEASE_TTL_S + 4, f"node 1's keys lived {expired_s:.1f}s after the cut"
    served_after = {o.instance for o in outcomes if o.began > cut_at + expired_s and o.error is None}
    where = {i.id: i.node for i in instances(cluster)}
    assert served_after and all(where.get(i) == node2 for i in served_after), (served_after, where)
    print(f"cut node 1: keys gone after {expired_s:.2f}s; {len(outcomes)} requests, {len(failed)} failed "
          f"(in flight), slowest {slowest:.1f}s", *report, sep="\n  ")
