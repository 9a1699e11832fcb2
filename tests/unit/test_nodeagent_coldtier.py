"""The cold-standby tier in the node agent's flows (``NodeAgent.cold_pass``), on the fakes of
test_nodeagent_operations (FakeEtcd, plain subprocesses, a recording checkpointer): the idle
clock, the page-out (the real one, on the stub's process), host memory counted at what the
standby keeps resident, the tier on the instance record and in the metrics, a restore that
stops a page-out, and a node without swap. A fake ``/proc/swaps`` stands for the node's swap: with
no real swap device the kernel keeps the pages, which tests/integration/test_cold_standby_swap.py
checks on a real one."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from services.nodeagent import operations
from services.nodeagent.agent import NodeAgent
from snapwake.v1 import nodeagent_pb2, types_pb2
from snapwake.v1.types_pb2 import InstanceState
from tests.unit.test_nodeagent_operations import Harness, harness, start_request  # noqa: F401

pytestmark = pytest.mark.timeout(30)
PROCESS, STANDBY = types_pb2.SNAPSHOT_MODE_PROCESS, nodeagent_pb2.START_TARGET_STANDBY
HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
GIB = 1 << 30


async def _start(h: Harness, tmp_path: Path, swaps: str) -> NodeAgent:
    h.config = dataclasses.replace(h.config, cold_standby_after_s=30.0, cold_standby_min_bytes=0)
    agent = await h.start()
    agent.swaps_path = tmp_path / "swaps"
    agent.swaps_path.write_text(swaps)
    return agent


def _sample(agent: NodeAgent, name: str, **labels: str) -> float:
    return agent.cold_metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_standby_parked_past_the_threshold_goes_cold_and_is_counted_at_what_it_keeps(
        harness: Harness, tmp_path: Path) -> None:  # noqa: F811
    agent = await _start(harness, tmp_path, HEADER + "/swapfile file 131068 0 -2\n")
    iid = "i-00000000c001"
    await operations.start_instance(agent, start_request(iid, target=STANDBY, mode=PROCESS))
    live = agent.instances[iid]
    admitted = live.standby_host_bytes
    assert admitted > 20 * GIB  # its GPU slice, counted until it is restored or paged out
    stored = await harness.instance(iid)
    assert stored is not None and stored.standby_tier == types_pb2.STANDBY_TIER_HOT

    harness.clock.now += 29.0
    await agent.cold_pass()
    assert not live.pageout_tried and agent.cold_due() == []  # not idle long enough yet
    harness.clock.now += 1.0
    assert agent.cold_due() == [live]
    await agent.cold_pass()
    assert agent._pageout is not None
    await agent._pageout

    assert live.cold and _sample(agent, "snapwake_nodeagent_cold_standbys") == 1.0
    assert _sample(agent, "snapwake_nodeagent_standby_pageouts_total", result="ok") == 1.0
    assert _sample(agent, "snapwake_nodeagent_standby_pageout_bytes_total") > 0
    stored = await harness.instance(iid)
    assert stored is not None and stored.standby_tier == types_pb2.STANDBY_TIER_COLD
    # Host memory counts what it keeps resident (the stub's few MB), not its admission estimate.
    assert 0 < live.standby_host_bytes < 512 << 20
    assert sum(h.bytes for h in agent.host_memory_held()) < 1 * GIB
    await agent.cold_pass()
    assert _sample(agent, "snapwake_nodeagent_standby_pageouts_total", result="ok") == 1.0  # once per park

    resp = await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    assert resp.instance.state == InstanceState.INSTANCE_STATE_RUNNING
    assert resp.instance.standby_tier == types_pb2.STANDBY_TIER_UNSPECIFIED and not live.cold
    assert _sample(agent, "snapwake_nodeagent_restore_seconds_count", tier="cold") == 1.0
    assert _sample(agent, "snapwake_nodeagent_restore_seconds_count", tier="hot") == 0.0
    assert _sample(agent, "snapwake_nodeagent_cold_standbys") == 0.0

    parked = await operations.suspend_instance(agent, iid)  # parked again: hot, its clock anew
    assert parked.standby_tier == types_pb2.STANDBY_TIER_HOT and not live.pageout_tried
    assert live.standby_since == harness.clock.now and agent.cold_due() == []


async def test_a_restore_stops_a_page_out_and_counts_as_hot(harness: Harness, tmp_path: Path) -> None:  # noqa: F811
    agent = await _start(harness, tmp_path, HEADER + "/swapfile file 131068 0 -2\n")
    iid = "i-00000000c002"
    await operations.start_instance(agent, start_request(iid, target=STANDBY, mode=PROCESS))
    harness.clock.now += 60.0
    await agent.cold_pass()
    assert agent._pageout is not None
    await operations.restore_instance(agent, nodeagent_pb2.RestoreInstanceRequest(instance_id=iid))
    await agent._pageout
    assert _sample(agent, "snapwake_nodeagent_standby_pageouts_total", result="cancelled") == 1.0
    assert _sample(agent, "snapwake_nodeagent_standby_pageouts_total", result="ok") == 0.0
    assert _sample(agent, "snapwake_nodeagent_restore_seconds_count", tier="hot") == 1.0
    assert not agent.instances[iid].cold


async def test_without_swap_nothing_is_paged_out_and_the_reason_is_logged_once(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    agent = await _start(harness, tmp_path, HEADER)
    iid = "i-00000000c003"
    await operations.start_instance(agent, start_request(iid, target=STANDBY, mode=PROCESS))
    harness.clock.now += 60.0
    with caplog.at_level(logging.WARNING, logger="services.nodeagent.agent"):
        await agent.cold_pass()
        await agent.cold_pass()
    assert agent._pageout is None and not agent.instances[iid].cold
    said = [r.getMessage() for r in caplog.records if "cold standbys off" in r.getMessage()]
    assert len(said) == 1 and "lists no swap device" in said[0]
    stored = await harness.instance(iid)
    assert stored is not None and stored.standby_tier == types_pb2.STANDBY_TIER_HOT
