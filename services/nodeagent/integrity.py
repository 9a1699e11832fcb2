"""Snapshot integrity on this node: pre-warm before a standby attaches, and mark corrupt copies.

The blobstore verifies every chunk it reads and never serves a bad one: a checksum failure with
no good copy on a peer drops the local copy and answers "snapshot S is corrupt: chunk N: ...".
When a standby start or a restore meets that answer, the nodeagent marks the snapshot record
CORRUPT (naming the chunk) so the scheduler rebuilds it, and the start fails with that reason.
The message crosses the handover and control sockets as text, so the corruption is recognised
by the blobstore's ``CorruptSnapshot`` wording (``corrupt_detail``), pinned by a unit test.
"""

from __future__ import annotations

import logging
import re

import grpc

from snapwake import errors, keys
from snapwake.etcd import EtcdClient
from snapwake.grpcclient import call
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc, types_pb2

__all__ = ["corrupt_detail", "note_failure", "prewarm"]

log = logging.getLogger(__name__)
_CORRUPT = re.compile(r"snapshot \S+ is corrupt: chunk \d+.*", re.DOTALL)


def corrupt_detail(message: str) -> str | None:
    """The blobstore's corruption report inside ``message`` (from "snapshot ... is corrupt"), or None."""
    found = _CORRUPT.search(message)
    return found.group(0).strip() if found else None


def _mark(snap: types_pb2.Snapshot, node: str, detail: str) -> types_pb2.Snapshot | None:
    # Only a READY record is marked: a BUILDING one is a rebuild already under way.
    if snap.state != types_pb2.SNAPSHOT_STATE_READY:
        return None
    snap.state = types_pb2.SNAPSHOT_STATE_CORRUPT
    snap.message = f"node {node}: {detail}"
    if node in snap.disk_nodes:  # the blobstore dropped its copy
        snap.disk_nodes.remove(node)
    return snap


async def note_failure(etcd: EtcdClient, node: str, inst: types_pb2.Instance, message: str) -> None:
    """Marks the instance's snapshot record CORRUPT when ``message`` reports a corrupt chunk.

    Only a READY record is marked (a BUILDING one is a rebuild already under way); the scheduler
    rebuilds a CORRUPT snapshot. Other failures leave the record alone.
    """
    detail = corrupt_detail(message)
    if detail is None:
        return
    log.error("snapshot %s is corrupt on %s: %s", keys.snapshot_id(inst.function_id, inst.revision), node, detail,
              extra={"instance_id": inst.id})
    try:
        await etcd.update(keys.snapshot_key(inst.function_id, inst.revision), types_pb2.Snapshot,
                           lambda snap: _mark(snap, node, detail))
    except errors.NotFound:  # built outside the scheduler (tools, tests): no record to mark
        return


async def prewarm(channel: grpc.aio.Channel, etcd: EtcdClient, node: str, inst: types_pb2.Instance,
                  limit_s: float) -> None:
    """Has the blobstore cache the instance's snapshot (from disk or a peer, every chunk verified)
    before a standby attaches it; raises ``StartFailed`` with the blobstore's reason (corrupt,
    missing, unreachable), after marking a corrupt snapshot's record."""
    sid = keys.snapshot_id(inst.function_id, inst.revision)
    stub = blobstore_pb2_grpc.BlobstoreServiceStub(channel)
    try:
        await call(stub.PrewarmSnapshot, blobstore_pb2.PrewarmSnapshotRequest(snapshot_id=sid), timeout=limit_s)
    except errors.SnapwakeError as exc:
        message = f"pre-warm of {sid} failed: {exc.message}"
        await note_failure(etcd, node, inst, message)
        raise errors.StartFailed(message) from exc
