"""Building a function revision's arena snapshot, or validating its user image, with bounded
retries.

The Snapshot record in etcd is the truth: BUILDING while a node builds it (``attempts``
counts builds begun), READY when the node stored it, FAILED with the node's reason. After
``max_attempts`` failed builds the function becomes FAILED with that reason; at once when the
node refused the start itself (``StartRefused``: a bad spec or an image it cannot pull).

A user image's "build" is its deploy validation (a START_TARGET_SNAPSHOT start): the node pulls
the image, starts it, waits for its readiness probe and warm-up, then ends it. The digest it
resolved is written on the function before the revision turns READY, and every later start of
the revision is pinned to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf.duration_pb2 import Duration

from services.scheduler.nodes import StartRefused
from services.scheduler.starter import Starter
from services.scheduler.state import ClusterState
from snapwake import errors, keys
from snapwake.imageref import is_builtin
from snapwake.v1.nodeagent_pb2 import StartTarget
from snapwake.v1.types_pb2 import Function, FunctionState, InstanceState, Snapshot, SnapshotState

__all__ = ["SnapshotBuilder"]

log = logging.getLogger(__name__)
Spawn = Callable[[str, Callable[[], Awaitable[None]]], None]


class SnapshotBuilder:
    def __init__(self, state: ClusterState, starter: Starter, max_attempts: int) -> None:
        self.state, self.starter, self.max_attempts = state, starter, max_attempts

    def reconcile(self, fn: Function, spawn: Spawn) -> None:
        """Moves one PENDING function toward READY or FAILED."""
        snap = self.state.snapshot(fn.id, fn.revision)
        key = f"snapshot {fn.id}@{fn.revision}"
        if snap is None or snap.state in (SnapshotState.SNAPSHOT_STATE_FAILED, SnapshotState.SNAPSHOT_STATE_CORRUPT):
            # A corrupt snapshot was built fine once: it is always rebuilt, only failed builds count.
            if snap is not None and snap.state == SnapshotState.SNAPSHOT_STATE_FAILED \
                    and snap.attempts >= self.max_attempts:
                spawn(f"fail {fn.id}", lambda: self._fail(fn, snap))
            else:
                spawn(key, lambda: self._build(fn, snap))
        elif snap.state == SnapshotState.SNAPSHOT_STATE_READY:
            pin = self.state.snapshot_pin(fn.id, fn.revision)
            if snap.manifest_digest and (pin is None or pin.manifest_digest != snap.manifest_digest):
                # Pinned by the build once it ends (same key: nothing while it runs). A build
                # whose leader died before pinning is pinned from the record as it stands; a
                # record whose digest moved off its pin since is not trusted: rebuilt.
                spawn(key, lambda: self._pin_from_record(fn))
            elif fn.state == FunctionState.FUNCTION_STATE_PENDING:
                spawn(f"ready {fn.id}", lambda: self._set_function(fn, FunctionState.FUNCTION_STATE_READY, ""))
        elif not self._building_somewhere(fn):
            # BUILDING with no node working on it: a previous leader died mid-build. Retry.
            spawn(key, lambda: self._build(fn, snap))

    def _building_somewhere(self, fn: Function) -> bool:
        return any(i.function_id == fn.id and i.revision == fn.revision
                   and i.state in (InstanceState.INSTANCE_STATE_CREATING, InstanceState.INSTANCE_STATE_SNAPSHOTTING)
                   for i in self.state.instances())

    async def _build(self, fn: Function, prev: Snapshot | None) -> None:
        placement = await self.starter.place(fn)
        if placement is None:
            return  # no room now; the next pass tries again without spending an attempt
        snap = Snapshot(id=keys.snapshot_id(fn.id, fn.revision), function_id=fn.id, revision=fn.revision,
                        state=SnapshotState.SNAPSHOT_STATE_BUILDING,
                        attempts=(prev.attempts if prev else 0) + 1)
        await self.state.put_snapshot(snap)
        began = time.monotonic()
        log.info("building snapshot, attempt %d", snap.attempts, extra={"function_id": fn.id})
        try:
            built = await self.starter.start_target(fn, placement.node, placement.gpu_index,
                                                    StartTarget.START_TARGET_SNAPSHOT)
        except errors.StartFailed as exc:
            await self._mark(fn, SnapshotState.SNAPSHOT_STATE_FAILED, exc.message, time.monotonic() - began)
            if isinstance(exc, StartRefused):  # the same start would be refused again
                snap.message = exc.message
                await self._fail(fn, snap)
            return
        if built.image_digest:  # before READY: no start of this revision may go unpinned
            await self._pin(fn, built.image_digest)
        await self._mark(fn, SnapshotState.SNAPSHOT_STATE_READY, "", time.monotonic() - began)
        await self._pin_snapshot(fn, placement.node.name)

    async def _pin_snapshot(self, fn: Function, node: str) -> None:
        """Pins the manifest digest ``node`` recorded for the snapshot it was asked to build."""
        entry = await self.state.etcd.get(keys.snapshot_key(fn.id, fn.revision), Snapshot)
        snap = entry.value if entry is not None else None
        if not isinstance(snap, Snapshot) or snap.state != SnapshotState.SNAPSHOT_STATE_READY \
                or not snap.manifest_digest:
            return  # no arena snapshot (another mode, a user image): nothing to attach
        if node not in snap.disk_nodes:
            # The node asked to build it is not a holder: the record was written by another.
            await self._mark_failed_record(fn, f"the snapshot record does not name {node}, the node that built it")
            return
        await self.state.pin_snapshot(snap, node)
        log.info("snapshot pinned to manifest %s built on %s", snap.manifest_digest, node,
                 extra={"function_id": fn.id})

    async def _pin_from_record(self, fn: Function) -> None:
        snap = self.state.snapshot(fn.id, fn.revision)
        pin = self.state.snapshot_pin(fn.id, fn.revision)
        if snap is None or snap.state != SnapshotState.SNAPSHOT_STATE_READY:
            return
        if pin is None and snap.disk_nodes:
            await self._pin_snapshot(fn, snap.disk_nodes[0])
        elif pin is not None and pin.manifest_digest != snap.manifest_digest:
            await self._mark_failed_record(fn, f"its manifest digest {snap.manifest_digest} is not the one "
                                               f"pinned at its build ({pin.manifest_digest})")

    async def _mark_failed_record(self, fn: Function, why: str) -> None:
        log.error("snapshot of revision %d not trusted: %s; rebuilding", fn.revision, why,
                  extra={"function_id": fn.id})

        def mutate(snap: Snapshot) -> Snapshot:
            snap.state, snap.message = SnapshotState.SNAPSHOT_STATE_CORRUPT, why  # type: ignore[assignment]
            return snap

        await self.state.etcd.update(keys.snapshot_key(fn.id, fn.revision), Snapshot, mutate)

    async def _pin(self, fn: Function, digest: str) -> None:
        def mutate(cur: Function) -> Function | None:
            if cur.revision != fn.revision or cur.image_digest == digest:
                return None
            cur.image_digest = digest
            return cur

        await self.state.update_function(fn.id, mutate)
        log.info("revision %d runs image %s@%s", fn.revision, fn.spec.image, digest, extra={"function_id": fn.id})

    async def _mark(self, fn: Function, state: SnapshotState, message: str, took_s: float) -> None:
        def mutate(snap: Snapshot) -> Snapshot | None:
            if snap.state != SnapshotState.SNAPSHOT_STATE_BUILDING:
                return None  # the node already wrote its outcome
            snap.state, snap.message = state, message  # type: ignore[assignment]
            snap.build_duration.CopyFrom(Duration(seconds=int(took_s), nanos=int(took_s % 1 * 1e9)))
            return snap

        await self.state.etcd.update(keys.snapshot_key(fn.id, fn.revision), Snapshot, mutate)

    async def _fail(self, fn: Function, snap: Snapshot) -> None:
        what = "snapshot build" if is_builtin(fn.spec.image) else f"deploy of image {fn.spec.image}"
        tries = f"{snap.attempts} attempt" + ("s" if snap.attempts != 1 else "")
        why = f"{what} failed after {tries}: {snap.message or 'no reason given'}"
        await self._set_function(fn, FunctionState.FUNCTION_STATE_FAILED, why)

    async def _set_function(self, fn: Function, state: FunctionState, message: str) -> None:
        def mutate(cur: Function) -> Function | None:
            if cur.revision != fn.revision or cur.state != FunctionState.FUNCTION_STATE_PENDING:
                return None
            cur.state, cur.status_message = state, message  # type: ignore[assignment]
            return cur

        await self.state.update_function(fn.id, mutate)
        log.info("function is now %s %s", FunctionState.Name(state), message, extra={"function_id": fn.id})
