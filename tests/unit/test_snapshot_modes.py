"""Pure parts of process snapshot mode and of corrupt-snapshot handling (nodeagent, scheduler)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.blobstore.store.base import CorruptSnapshot
from services.nodeagent.integrity import _add_disk_node, _mark, corrupt_detail, peer_blobstores
from services.nodeagent.machine import StartPlan, modelserver_start_mode
from services.nodeagent.operations import validate_start
from services.nodeagent.process_mode import warm_up_request
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.starter import snapshot_usable
from snapwake import errors
from snapwake.v1 import nodeagent_pb2, types_pb2

M = types_pb2.SnapshotMode
SS = types_pb2.SnapshotState
SID = "default/default/demo@1"


@pytest.mark.parametrize(("plan", "process", "mode"), [
    (StartPlan.STANDBY, True, "load"),
    (StartPlan.STANDBY, False, "standby"),
    (StartPlan.RUNNING, True, "load"),
    (StartPlan.SNAPSHOT, False, "snapshot"),
])
def test_runtime_start_mode(plan: StartPlan, process: bool, mode: str) -> None:
    assert modelserver_start_mode(plan, process) == mode


@pytest.mark.parametrize(("sample", "expected"), [
    ('{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}',
     ("/v1/chat/completions", {"model": "warm-up", "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 1, "stream": False})),
    ('{"prompt": "a", "model": "m", "stream": true}', ("/v1/completions", {"model": "m", "prompt": "a",
                                                                            "stream": False})),
    ("", None),
])
def test_warm_up_request(sample: str, expected: tuple[str, dict[str, object]] | None) -> None:
    assert warm_up_request(sample) == expected


@pytest.mark.parametrize("sample", ["{not json", "[1, 2]"])
def test_warm_up_request_names_the_field(sample: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        warm_up_request(sample)
    assert err.value.field == "spec.sample_request"


# The blobstore's own wording, as it reaches the nodeagent through gRPC, handover and control.
_STORE = CorruptSnapshot(SID, 3).message
_REFETCH = CorruptSnapshot(SID, 0, "checksum failed; local copy dropped and no good copy (no peers configured)").message


@pytest.mark.parametrize(("message", "detail"), [
    (f"pre-warm of {SID} failed: {_REFETCH}", _REFETCH),
    (f"restore of i-0 failed: control attach failed: blobstore refused load of {SID}: {_STORE}", _STORE),
    (f"i-0: the container exited before it was ready; container output:\nERROR start failed: {_STORE}\n", _STORE),
    (f"pre-warm of {SID} failed: snapshot {SID} not found locally nor (no peers configured)", None),
    ("restore of i-0 failed: control attach: [Errno 111] Connection refused", None),
])
def test_corrupt_detail(message: str, detail: str | None) -> None:
    assert corrupt_detail(message) == detail


@pytest.mark.parametrize(("state", "marked"), [
    (SS.SNAPSHOT_STATE_READY, True),
    (SS.SNAPSHOT_STATE_BUILDING, False),  # a rebuild is under way: leave it
    (SS.SNAPSHOT_STATE_CORRUPT, False),
    (SS.SNAPSHOT_STATE_FAILED, False),
])
def test_mark_corrupt_only_a_ready_record(state: int, marked: bool) -> None:
    snap = types_pb2.Snapshot(id=SID, state=state, disk_nodes=["node-0", "node-1"])  # type: ignore[arg-type]
    out = _mark(snap, "node-0", "snapshot x is corrupt: chunk 0: sha256 mismatch")
    if not marked:
        assert out is None
        return
    assert out is not None and out.state == SS.SNAPSHOT_STATE_CORRUPT
    assert out.message == "node node-0: snapshot x is corrupt: chunk 0: sha256 mismatch"
    assert list(out.disk_nodes) == ["node-1"]


_NODES = [types_pb2.Node(name="n0", blobstore_address="10.0.0.10:7080"),
          types_pb2.Node(name="n1", blobstore_address="10.0.1.10:7080"),
          types_pb2.Node(name="n2", blobstore_address="10.0.2.10:7080"),
          types_pb2.Node(name="n3")]  # no blobstore published


@pytest.mark.parametrize(("disk_nodes", "record", "me", "peers"), [
    (["n1"], True, "n0", ["10.0.1.10:7080"]),
    (["n2", "n1"], True, "n0", ["10.0.2.10:7080", "10.0.1.10:7080"]),  # the record's order
    (["n0", "n1"], True, "n0", ["10.0.1.10:7080"]),  # never this node itself
    (["gone", "n1"], True, "n0", ["10.0.1.10:7080"]),  # no node record: its lease expired
    (["n3"], True, "n0", []),
    ([], True, "n0", []),  # a record that names no holder: nobody has it
    ([], False, "n0", ["10.0.1.10:7080", "10.0.2.10:7080"]),  # no record (built by hand): ask everyone
])
def test_peer_blobstores(disk_nodes: list[str], record: bool, me: str, peers: list[str]) -> None:
    snap = types_pb2.Snapshot(id=SID, disk_nodes=disk_nodes) if record else None
    assert peer_blobstores(snap, _NODES, me) == peers


@pytest.mark.parametrize(("state", "disk_nodes", "added"), [
    (SS.SNAPSHOT_STATE_READY, ["n1"], True),
    (SS.SNAPSHOT_STATE_READY, ["n1", "n0"], False),
    (SS.SNAPSHOT_STATE_BUILDING, ["n1"], False),
    (SS.SNAPSHOT_STATE_CORRUPT, ["n1"], False),
])
def test_a_peer_fetch_adds_the_node_to_disk_nodes(state: int, disk_nodes: list[str], added: bool) -> None:
    out = _add_disk_node(types_pb2.Snapshot(id=SID, state=state, disk_nodes=disk_nodes), "n0")  # type: ignore[arg-type]
    assert (out is not None) == added
    if out is not None:
        assert list(out.disk_nodes) == [*disk_nodes, "n0"]


def _fn(mode: int) -> types_pb2.Function:
    fn = types_pb2.Function(id="default/default/demo", revision=1, state=types_pb2.FUNCTION_STATE_READY)
    fn.spec.policy.snapshot_mode = mode  # type: ignore[assignment]
    return fn


@pytest.mark.parametrize(("mode", "state", "usable"), [
    (M.SNAPSHOT_MODE_ARENA, SS.SNAPSHOT_STATE_READY, True),
    (M.SNAPSHOT_MODE_ARENA, SS.SNAPSHOT_STATE_CORRUPT, False),
    (M.SNAPSHOT_MODE_ARENA, SS.SNAPSHOT_STATE_BUILDING, False),
    (M.SNAPSHOT_MODE_ARENA, None, False),
    (M.SNAPSHOT_MODE_PROCESS, None, True),
    (M.SNAPSHOT_MODE_NONE, None, True),
])
def test_snapshot_usable(mode: int, state: int | None, usable: bool) -> None:
    snap = None if state is None else types_pb2.Snapshot(state=state)  # type: ignore[arg-type]
    assert snapshot_usable(_fn(mode), snap) is usable


@dataclass
class _State:
    """Just the two queries ``SnapshotBuilder.reconcile`` makes."""

    snap: types_pb2.Snapshot | None
    building: list[types_pb2.Instance] = field(default_factory=list)

    def snapshot(self, function_id: str, revision: int) -> types_pb2.Snapshot | None:
        return self.snap

    def instances(self) -> list[types_pb2.Instance]:
        return self.building


@pytest.mark.parametrize(("state", "attempts", "spawned"), [
    (SS.SNAPSHOT_STATE_CORRUPT, 3, "snapshot"),  # built fine once: always rebuilt
    (SS.SNAPSHOT_STATE_CORRUPT, 1, "snapshot"),
    (SS.SNAPSHOT_STATE_FAILED, 3, "fail"),
    (SS.SNAPSHOT_STATE_FAILED, 2, "snapshot"),
])
def test_builder_rebuilds_a_corrupt_snapshot(state: int, attempts: int, spawned: str) -> None:
    snap = types_pb2.Snapshot(id=SID, state=state, attempts=attempts)  # type: ignore[arg-type]
    builder = SnapshotBuilder(_State(snap), starter=None, max_attempts=3)  # type: ignore[arg-type]
    keys: list[str] = []
    builder.reconcile(_fn(M.SNAPSHOT_MODE_ARENA), lambda key, make: keys.append(key))
    assert [k.split()[0] for k in keys] == [spawned]


def test_process_mode_has_no_snapshot_to_build(tmp_path: object) -> None:
    req = nodeagent_pb2.StartInstanceRequest(instance_id="i-0123456789ab", function_id="default/default/p",
                                             revision=1, target=nodeagent_pb2.START_TARGET_SNAPSHOT,
                                             spec=types_pb2.FunctionSpec(model_dir=str(tmp_path)))
    req.spec.policy.snapshot_mode = M.SNAPSHOT_MODE_PROCESS
    with pytest.raises(errors.InvalidArgument) as err:
        validate_start(req)
    assert err.value.field == "target"
    req.target = nodeagent_pb2.START_TARGET_STANDBY
    assert validate_start(req) is StartPlan.STANDBY
