"""``snapwake.devcluster.Supervisor``: restarts what dies, with backoff, and leaves alone what
was stopped on purpose or is held. The service processes are ``sleep`` processes here (the
cluster's ``start_service`` is replaced); the fault matrix runs it over the real services."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapwake.devcluster import Cluster, ClusterConfig, Supervisor
from snapwake.testing import wait_for


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(ClusterConfig(var_dir=tmp_path, etcd_endpoints=("127.0.0.1:1",), gateway_port=0, scheduler_port=0,
                              nodeagent_port=0, blobstore_port=0, etcd_port=0))

    def start(name: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        c.procs[name] = subprocess.Popen(["sleep", "60"])
        return c.procs[name]

    c.start_service = start  # type: ignore[method-assign]
    for name in ("gateway", "scheduler"):
        start(name)
    yield c
    if c.supervisor is not None:
        c.supervisor.stop()
    for proc in c.procs.values():
        proc.kill()
        proc.wait()


def test_a_killed_process_is_restarted_and_one_that_keeps_dying_waits_longer(cluster: Cluster) -> None:
    sup = cluster.supervise(backoff_s=0.2, max_backoff_s=0.8, stable_s=30, poll_s=0.02)
    first = cluster.kill("gateway")
    wait_for(lambda: len(sup.events) == 1, 5, "the first restart")
    assert cluster.procs["gateway"].pid != first and cluster.procs["gateway"].poll() is None
    assert cluster.procs["scheduler"].poll() is None and sup.events[0]["name"] == "gateway"
    cluster.kill("gateway")  # again within stable_s: the backoff doubles
    wait_for(lambda: len(sup.events) == 2, 5, "the second restart")
    waits = [float(e["back_at"]) - float(e["dead_at"]) for e in sup.events]  # type: ignore[arg-type]
    assert waits[0] >= 0.2 and waits[1] >= 0.4, waits  # 0.2 s, then doubled


def test_a_deliberate_stop_and_a_held_process_are_left_down(cluster: Cluster) -> None:
    sup = Supervisor(cluster, backoff_s=0.05, poll_s=0.02).start()
    cluster.stop_service("scheduler")
    sup.hold("gateway")
    cluster.kill("gateway")
    with pytest.raises(TimeoutError):
        wait_for(lambda: bool(sup.events), 0.5, "a restart")
    assert "scheduler" not in cluster.procs and cluster.procs["gateway"].poll() is not None
    sup.release("gateway")
    wait_for(lambda: bool(sup.events), 5, "the restart after the release")
    assert [e["name"] for e in sup.events] == ["gateway"] and cluster.procs["gateway"].poll() is None
    sup.stop()
