"""Snapshot integrity on this node: pre-warm before a standby attaches, and mark corrupt copies.

A pre-warm names the peers to fetch a missing snapshot from: the nodes whose blobstores hold it
on disk (the snapshot record's ``disk_nodes``), at the blobstore addresses their node records
advertise, with the record's manifest digest (``peer_blobstores``). The blobstore itself never
reads etcd. A copy fetched from a peer adds this node to ``disk_nodes``, so the next node that
needs it has one more source.

The blobstore verifies every chunk it reads and never serves a bad one: a checksum failure with
no good copy on a peer drops the local copy and answers "snapshot S is corrupt: chunk N: ...".
When a standby start or a restore meets that answer, the nodeagent marks the snapshot record
CORRUPT (naming the chunk) so the scheduler rebuilds it, and the start fails with that reason.
The message crosses the handover and control sockets as text, so the corruption is recognised
by the blobstore's ``CorruptSnapshot`` wording (``corrupt_detail``), pinned by a unit test.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from typing import cast

import grpc

from snapwake import errors, keys
from snapwake.etcd import EtcdClient
from snapwake.grpcclient import call
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc, types_pb2

__all__ = ["attach_digest", "corrupt_detail", "note_failure", "peer_blobstores", "prewarm"]

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


async def attach_digest(etcd: EtcdClient, inst: types_pb2.Instance, snap: types_pb2.Snapshot | None) -> str:
    """The manifest digest a copy of the instance's snapshot must have to be attached: the one
    the scheduler pinned when the node it asked built it (``/snapwake/snapshot-pins/...``, which
    no node can write), not the shared record's, which any node's certificate can overwrite;
    the record's only where there is no pin (built before pins, or by tools and tests)."""
    entry = await etcd.get(keys.snapshot_pin_key(inst.function_id, inst.revision), types_pb2.Snapshot)
    recorded = snap.manifest_digest if snap is not None else ""
    if entry is None:
        return recorded
    pinned = cast(types_pb2.Snapshot, entry.value).manifest_digest
    if recorded and recorded != pinned:
        log.error("snapshot %s: the record's manifest digest %s is not the pinned %s; attaching only the pinned",
                  keys.snapshot_id(inst.function_id, inst.revision), recorded, pinned, extra={"instance_id": inst.id})
    return pinned


def peer_blobstores(snap: types_pb2.Snapshot | None, nodes: Sequence[types_pb2.Node], me: str) -> list[str]:
    """The advertised blobstore addresses of the live nodes (those with a node record) that hold
    ``snap`` on disk, other than ``me``; every other live node's when there is no record."""
    by_name = {n.name: n for n in nodes if n.name != me and n.blobstore_address}
    holders = list(snap.disk_nodes) if snap is not None else sorted(by_name)
    return [by_name[name].blobstore_address for name in holders if name in by_name]


def _add_disk_node(snap: types_pb2.Snapshot, node: str) -> types_pb2.Snapshot | None:
    if snap.state != types_pb2.SNAPSHOT_STATE_READY or node in snap.disk_nodes:
        return None
    snap.disk_nodes.append(node)
    return snap


async def prewarm(channel: grpc.aio.Channel, etcd: EtcdClient, node: str, inst: types_pb2.Instance,
                  limit_s: float) -> None:
    """Has the blobstore cache the instance's snapshot (from disk or a peer, every chunk verified)
    before a standby attaches it; raises ``StartFailed`` with the blobstore's reason (corrupt,
    missing, unreachable), after marking a corrupt snapshot's record."""
    sid = keys.snapshot_id(inst.function_id, inst.revision)
    key = keys.snapshot_key(inst.function_id, inst.revision)
    stub = blobstore_pb2_grpc.BlobstoreServiceStub(channel)
    try:
        entry = await etcd.get(key, types_pb2.Snapshot)
        snap = cast(types_pb2.Snapshot, entry.value) if entry is not None else None
        nodes = [cast(types_pb2.Node, e.value) for e in await etcd.list(keys.NODES, types_pb2.Node)]
        request = blobstore_pb2.PrewarmSnapshotRequest(
            snapshot_id=sid, peers=peer_blobstores(snap, nodes, node),
            manifest_digest=await attach_digest(etcd, inst, snap))
        reply = await call(stub.PrewarmSnapshot, request, timeout=limit_s)
    except errors.SnapwakeError as exc:
        message = f"pre-warm of {sid} failed: {exc.message}"
        await note_failure(etcd, node, inst, message)
        raise errors.StartFailed(message) from exc
    if reply.fetched_from_peer and snap is not None:
        log.info("fetched %s from a peer blobstore", sid, extra={"instance_id": inst.id})
        with contextlib.suppress(errors.NotFound):  # the record went (function deleted) meanwhile
            await etcd.update(key, types_pb2.Snapshot, lambda s: _add_disk_node(s, node))
