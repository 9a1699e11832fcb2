"""The etcd key layout. Values are protobuf messages stored as JSON (readable with etcdctl).

Desired state (written by the scheduler):
    /snapwake/functions/{tenant}/{namespace}/{name}   Function
    /snapwake/snapshots/{tenant}/{namespace}/{name}/{revision}   Snapshot
    /snapwake/cordons/{node}                          NodeCordon (an operator's cordon or drain)
    /snapwake/snapshot-pins/{tenant}/{namespace}/{name}/{revision}   Snapshot: the manifest digest the
                                                      node the scheduler asked to build it recorded
                                                      (only the scheduler writes here; nodes attach
                                                      only that digest, services.nodeagent.integrity)
    /snapwake/intents/{id}                            Instance: what the scheduler asked a node to start
                                                      (id, function_id, revision, node, create_time);
                                                      an instance record is believed only if it
                                                      matches one (services.scheduler.state)
Actual state (written by nodeagents, under their own etcd lease):
    /snapwake/nodes/{node}                            Node
    /snapwake/instances/{node}/{id}                   Instance (only that node's etcd user may write
                                                      under instances/{node}/, snapwake.etcdauth)
Access (written by the scheduler's admin API, operator calls only):
    /snapwake/access/tokens/{id}                      AdminToken (SHA-256 of the token, never the token)
    /snapwake/access/apikeys/{id}                     ApiKey (HMAC-SHA256 of the key, never the key)
    /snapwake/access/quotas/{tenant}                  TenantQuota (overrides of the configured defaults)
Coordination:
    /snapwake/leader                                  the elected scheduler's address
"""

from __future__ import annotations

__all__ = ["ACCESS", "ADMIN_TOKENS", "API_KEYS", "QUOTAS", "admin_token_key", "api_key_key", "quota_key", "CORDONS", "FUNCTIONS", "INSTANCES", "INTENTS", "LEADER", "NODES", "PREFIX", "SNAPSHOTS", "SNAPSHOT_PINS", "cordon_key",
           "function_key", "instance_key", "instance_matches_key", "intent_key", "split_intent_key", "instance_prefix", "node_key", "split_instance_key", "snapshot_id", "snapshot_key", "snapshot_pin_key", "split_snapshot_id"]

PREFIX = "/snapwake/"
FUNCTIONS = PREFIX + "functions/"
NODES = PREFIX + "nodes/"
INSTANCES = PREFIX + "instances/"
INTENTS = PREFIX + "intents/"
SNAPSHOTS = PREFIX + "snapshots/"
SNAPSHOT_PINS = PREFIX + "snapshot-pins/"
LEADER = PREFIX + "leader"
CORDONS = PREFIX + "cordons/"
ACCESS = PREFIX + "access/"
ADMIN_TOKENS = ACCESS + "tokens/"
API_KEYS = ACCESS + "apikeys/"
QUOTAS = ACCESS + "quotas/"


def function_key(function_id: str) -> str:
    return FUNCTIONS + function_id


def node_key(node: str) -> str:
    return NODES + node


def cordon_key(node: str) -> str:
    return CORDONS + node


def instance_prefix(node: str) -> str:
    """The prefix of ``node``'s instance records: the only instance keys its etcd user may write."""
    return f"{INSTANCES}{node}/"


def instance_key(node: str, instance_id: str) -> str:
    return instance_prefix(node) + instance_id


def split_instance_key(key: str) -> tuple[str, str] | None:
    """``/snapwake/instances/{node}/{id}`` -> (node, id); None for any other key."""
    node, sep, instance_id = key.removeprefix(INSTANCES).partition("/")
    if not key.startswith(INSTANCES) or not sep or not node or not instance_id or "/" in instance_id:
        return None
    return node, instance_id


def instance_matches_key(key: str, node: str, instance_id: str) -> bool:
    """Whether a record read at ``key`` is the instance it says it is (``node``, ``instance_id``):
    a node's etcd user writes only under its own prefix, so a record naming another node (or
    an id other than its key's) is forged or corrupt, and the scheduler ignores it."""
    return split_instance_key(key) == (node, instance_id)


def intent_key(instance_id: str) -> str:
    """Where the scheduler records an instance it asked a node to start (only it writes here)."""
    return INTENTS + instance_id


def split_intent_key(key: str) -> str | None:
    """``/snapwake/intents/{id}`` -> id; None for any other key."""
    instance_id = key.removeprefix(INTENTS)
    if not key.startswith(INTENTS) or not instance_id or "/" in instance_id:
        return None
    return instance_id


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


def snapshot_pin_key(function_id: str, revision: int) -> str:
    return f"{SNAPSHOT_PINS}{function_id}/{revision}"


def admin_token_key(token_id: str) -> str:
    return ADMIN_TOKENS + token_id


def api_key_key(key_id: str) -> str:
    return API_KEYS + key_id


def quota_key(tenant: str) -> str:
    return QUOTAS + tenant
