"""The etcd key layout. Values are protobuf messages stored as JSON (readable with etcdctl).

Desired state (written by the scheduler):
    /snapwake/functions/{tenant}/{namespace}/{name}   Function
    /snapwake/snapshots/{tenant}/{namespace}/{name}/{revision}   Snapshot
    /snapwake/cordons/{node}                          NodeCordon (an operator's cordon or drain)
Actual state (written by nodeagents, under their own etcd lease):
    /snapwake/nodes/{node}                            Node
    /snapwake/instances/{id}                          Instance
Coordination:
    /snapwake/leader                                  the elected scheduler's address
"""

from __future__ import annotations

__all__ = ["CORDONS", "FUNCTIONS", "INSTANCES", "LEADER", "NODES", "PREFIX", "SNAPSHOTS", "cordon_key",
           "function_key", "instance_key", "node_key", "snapshot_id", "snapshot_key", "split_snapshot_id"]

PREFIX = "/snapwake/"
FUNCTIONS = PREFIX + "functions/"
NODES = PREFIX + "nodes/"
INSTANCES = PREFIX + "instances/"
SNAPSHOTS = PREFIX + "snapshots/"
LEADER = PREFIX + "leader"
CORDONS = PREFIX + "cordons/"


def function_key(function_id: str) -> str:
    return FUNCTIONS + function_id


def node_key(node: str) -> str:
    return NODES + node


def cordon_key(node: str) -> str:
    return CORDONS + node


def instance_key(instance_id: str) -> str:
    return INSTANCES + instance_id


def snapshot_id(function_id: str, revision: int) -> str:
    """The id of a function revision's snapshot, ``{tenant}/{namespace}/{name}@{revision}``."""
    return f"{function_id}@{revision}"


def split_snapshot_id(sid: str) -> tuple[str, int]:
    function_id, sep, rev = sid.rpartition("@")
    if not sep or not rev.isdigit() or function_id.count("/") != 2:
        raise ValueError(f"bad snapshot id {sid!r}: expected tenant/namespace/name@revision")
    return function_id, int(rev)


def snapshot_key(function_id: str, revision: int) -> str:
    return f"{SNAPSHOTS}{function_id}/{revision}"
