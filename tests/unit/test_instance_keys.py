"""Instance records are keyed under their node (``/snapwake/instances/{node}/{id}``), where only
that node's etcd user may write (``snapwake.etcdauth``, tested against a real etcd in
test_etcd_auth). The scheduler's side: a record whose node or id differs from its key is not
believed, and a record deleted under one node's prefix does not drop the claims of the same id
recorded by another node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from services.scheduler.claims import ClaimBroker
from services.scheduler.claimtable import ClaimTable
from services.scheduler.nodes_fake import FakeNodeClient
from services.scheduler.starter import Starter
from services.scheduler.state import ClusterState, intent_of
from snapwake import keys
from snapwake.etcd_fake import FakeEtcd
from snapwake.v1.types_pb2 import Instance, InstanceState

pytestmark = pytest.mark.timeout(30)
RUNNING = InstanceState.INSTANCE_STATE_RUNNING


def test_instance_keys_name_their_node() -> None:
    assert keys.instance_key("node-a", "i-1") == "/snapwake/instances/node-a/i-1"
    assert keys.instance_key("node-a", "i-1").startswith(keys.instance_prefix("node-a"))
    assert not keys.instance_key("node-a2", "i-1").startswith(keys.instance_prefix("node-a"))
    assert keys.split_instance_key("/snapwake/instances/node-a/i-1") == ("node-a", "i-1")
    for bad in ("/snapwake/instances/i-1", "/snapwake/instances/node-a/", "/snapwake/instances//i-1",
                "/snapwake/instances/node-a/i-1/x", "/snapwake/nodes/node-a/i-1"):
        assert keys.split_instance_key(bad) is None, bad
    assert keys.instance_matches_key("/snapwake/instances/node-a/i-1", "node-a", "i-1")
    assert not keys.instance_matches_key("/snapwake/instances/node-b/i-1", "node-a", "i-1")
    assert not keys.instance_matches_key("/snapwake/instances/node-a/i-2", "node-a", "i-1")


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 3
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_the_scheduler_ignores_records_that_do_not_belong_at_their_key() -> None:
    etcd = FakeEtcd()
    real = Instance(id="i-00000000000a", function_id="t/n/f", revision=1, node="node-a", state=RUNNING,
                    endpoint="10.0.0.1:9000")
    # Written before the scheduler starts (its first list) ...
    forged = Instance(id="i-00000000000b", function_id="t/n/f", revision=1, node="node-a", state=RUNNING,
                      endpoint="10.6.6.6:9000")
    await etcd.put(keys.instance_key("node-b", forged.id), forged)
    for asked in (real, forged):  # the scheduler asked node-a for both
        await etcd.put(keys.intent_key(asked.id), intent_of(asked))
    state = ClusterState(etcd)
    table = ClaimTable(time.monotonic, 30.0)
    ClaimBroker(state, Starter(state, FakeNodeClient(etcd), table, stale_after_s=30.0), table)  # follows state
    await state.start()
    try:
        assert state.instances() == []  # node-b's key, node-a's record: not believed
        # ... and through the watch: a mismatched id, or another node's name.
        await etcd.put(keys.instance_key("node-a", real.id), real)
        await etcd.put(keys.instance_key("node-b", "i-00000000000c"), real)
        await etcd.put(keys.instance_key("node-b", real.id), real)
        await _until(lambda: state.instance(real.id) is not None, "the real record")
        await asyncio.sleep(0.05)
        assert [(i.id, i.node) for i in state.instances()] == [(real.id, "node-a")]
        # node-b deleting a key of the same id under its own prefix leaves node-a's claims.
        claim = table.try_grant(real.id, real.function_id, "gw", 4)
        assert claim is not None
        await etcd.delete(keys.instance_key("node-b", real.id))
        await asyncio.sleep(0.05)
        assert table.in_use(real.id) == 1
        # A belonging record overwritten with one that does not counts as gone.
        moved = Instance()
        moved.CopyFrom(real)
        moved.node = "node-b"
        await etcd.put(keys.instance_key("node-a", real.id), moved)
        await _until(lambda: state.instance(real.id) is None, "the overwritten record dropped")
        await _until(lambda: table.in_use(real.id) == 0, "its claims dropped with it")
    finally:
        await state.stop()
