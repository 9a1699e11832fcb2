"""The fault matrix's short form (``bench/faults.py``): a supervised cluster with two gateways, two
schedulers and two nodes serves a steady load through the ``openai`` client (retries off) while
parts of it are killed with SIGKILL; every answer is checked against the greedy text. Nothing may
be lost, and each part must be back (restarted by ``snapwake.devcluster.Supervisor``) and the
load served again within a bound. Only faults that need no container start run here (a start
costs a minute on a loaded machine); the full matrix (a nodeagent, a blobstore, an instance
container, a full disk, etcd stopped) is ``python -m bench.faults``, its numbers in the README.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.faults import run_matrix

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ELECTION_TTL_S = 2
FAULTS = ("gateway", "scheduler-leader", "etcd-member")
# Seconds from the kill until the part is back and a request sent after that was served: a
# restart (a Python service's start on a loaded two-core machine) plus, for the leader, the
# election; generous for CI machines shared with other jobs.
RECOVERY_BOUND_S = {"gateway": 30.0, "scheduler-leader": 30.0 + ELECTION_TTL_S, "etcd-member": 30.0}


@pytest.fixture(scope="module")
def matrix() -> dict[str, Any]:
    return run_matrix(FAULTS, etcd_members=3, nodes=2, snapshots=False, workers=3, pre_s=2.0, post_s=2.0,
                      recover_timeout_s=90.0,
                      extra_args={"scheduler": ["--election-ttl-s", str(ELECTION_TTL_S)],
                                  "nodeagent": ["--lease-ttl", "3"]})


def test_no_request_is_lost_and_every_part_recovers(matrix: dict[str, Any]) -> None:
    rows = {r["fault"]: r for r in matrix["faults"]}
    assert list(rows) == list(FAULTS)
    for fault, row in rows.items():
        detail = f"{fault}: {row}"
        assert "error" not in row, detail
        assert row["lost"] == 0, detail
        assert row["sent"] == row["served"] + row["failed_clean"] + row["cut"] + row["lost"], detail
        assert row["served"] >= 5, detail  # the load really ran through the fault
        assert row["recovery_s"] is not None and row["recovery_s"] <= RECOVERY_BOUND_S[fault], detail
    assert matrix["after_last_phase"]["lost"] == 0, matrix["after_last_phase"]
    # Only a gateway's own connections can be cut here: no instance was killed.
    assert rows["scheduler-leader"]["cut"] == 0 and rows["etcd-member"]["cut"] == 0


def test_the_supervisor_restarted_each_killed_process(matrix: dict[str, Any]) -> None:
    restarted = [r["name"] for r in matrix["restarts"] if "error" not in r]
    killed = [r["target"].split()[0] for r in matrix["faults"]]
    assert killed[0] == "gateway" and killed[1].startswith("scheduler") and killed[2].startswith("etcd-m")
    assert restarted == killed, matrix["restarts"]
