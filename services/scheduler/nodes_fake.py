"""``FakeNodeClient``: the scheduler's calls to nodeagents, answered in memory, for unit tests.

Every call is recorded in ``calls``. By default a call succeeds and, when the fake is given an
``EtcdClient``, writes the instance's key as a nodeagent would, so a ``ClusterState`` watching
the same etcd sees what a real node reports:

    start      CREATING, then the target: RUNNING (with an endpoint) or STANDBY; a snapshot
               build ends with the key deleted. A scripted StartFailed leaves it FAILED, a
               NodeFull ENDED (a node refusing a standby ends it without a failure). A user
               image's instance reports the digest it was pinned to, else ``fake_digest`` of
               its reference (what a node's pull would resolve).
    restore    RESTORING, then RUNNING on the asked GPU (StartFailed unless it was STANDBY)
    suspend    STANDBY (FailedPrecondition unless it was RUNNING or IDLE)
    stop       the key deleted (an unknown instance is no error, as with ``NodeClient``)

``script(op, ...)`` queues the outcomes of the next calls of one kind: an error to raise, a
delay before answering, or both. A ``NodeUnreachable`` outcome writes nothing (the call never
reached a node) and leaves the node out of ``reachable`` until ``heal``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field

from services.scheduler.nodes import NodeFull, NodeUnreachable
from snapwake import errors, keys
from snapwake.etcd import EtcdClient
from snapwake.imageref import is_builtin
from snapwake.v1.nodeagent_pb2 import StartTarget
from snapwake.v1.types_pb2 import FunctionSpec, Instance, InstanceState, Node

__all__ = ["Call", "FakeNodeClient", "Outcome", "fake_digest"]


def fake_digest(image: str) -> str:
    """The digest the fake "resolves" a user image reference to."""
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass(frozen=True)
class Call:
    """One call the scheduler made."""

    op: str  # start | restore | suspend | stop | logs
    node: str
    instance_id: str
    target: int = 0  # the StartTarget of a start
    image_digest: str = ""  # the digest a start was pinned to


@dataclass(frozen=True)
class Outcome:
    """How one scripted call ends: after ``delay_s``, raising ``error`` if there is one."""

    error: errors.SnapwakeError | None = None
    delay_s: float = 0.0


@dataclass
class FakeNodeClient:
    """Records calls, answers them as scripted, and writes instance keys to ``etcd`` if given."""

    etcd: EtcdClient | None = None
    calls: list[Call] = field(default_factory=list)
    unreachable: set[str] = field(default_factory=set)
    closed: bool = False
    _scripts: dict[str, list[Outcome]] = field(default_factory=dict)

    def script(self, op: str, *outcomes: Outcome) -> None:
        """Queues how the next calls of ``op`` end (later calls succeed at once again)."""
        self._scripts.setdefault(op, []).extend(outcomes)

    def count(self, op: str, target: int | None = None) -> int:
        return sum(1 for c in self.calls if c.op == op and (target is None or c.target == target))

    def heal(self, name: str) -> None:
        """The node answers again."""
        self.unreachable.discard(name)

    def reachable(self, name: str) -> bool:
        return name not in self.unreachable

    async def _begin(self, op: str, node: Node, instance_id: str, target: int = 0, image_digest: str = "") -> Outcome:
        """Records the call; raises NodeUnreachable at once if so scripted, else returns the outcome."""
        self.calls.append(Call(op, node.name, instance_id, target, image_digest))
        queued = self._scripts.get(op)
        outcome = queued.pop(0) if queued else Outcome()
        if isinstance(outcome.error, NodeUnreachable) or node.name in self.unreachable:
            self.unreachable.add(node.name)
            await asyncio.sleep(outcome.delay_s)
            raise outcome.error or NodeUnreachable(f"node {node.name}: no nodeagent answered")
        return outcome

    async def _end(self, outcome: Outcome, failed: Instance | None = None) -> None:
        await asyncio.sleep(outcome.delay_s)
        if outcome.error is None:
            return
        if failed is not None and isinstance(outcome.error, errors.StartFailed):
            state = InstanceState.INSTANCE_STATE_ENDED if isinstance(outcome.error, NodeFull) \
                else InstanceState.INSTANCE_STATE_FAILED
            await self._put(failed, state, outcome.error.message)
        raise outcome.error

    async def _put(self, inst: Instance, state: InstanceState, message: str = "") -> Instance:
        inst.state = state  # type: ignore[assignment]
        inst.message = message or inst.message
        inst.update_time.FromNanoseconds(time.time_ns())
        if self.etcd is not None:
            await self.etcd.put(keys.instance_key(inst.node, inst.id), inst)
        out = Instance()
        out.CopyFrom(inst)
        return out

    async def _stored(self, node: Node, instance_id: str) -> Instance:
        entry = None if self.etcd is None else await self.etcd.get(keys.instance_key(node.name, instance_id), Instance)
        return entry.value if entry is not None else Instance(id=instance_id, node=node.name)  # type: ignore[return-value]

    async def start(self, node: Node, instance_id: str, function_id: str, revision: int, spec: FunctionSpec,
                    target: int, gpu_index: int, timeout_s: float, image_digest: str = "") -> Instance:
        outcome = await self._begin("start", node, instance_id, target, image_digest)
        inst = Instance(id=instance_id, function_id=function_id, revision=revision, node=node.name,
                        gpu_index=gpu_index, gpu_memory_bytes=spec.resources.gpu_memory_bytes)
        if not is_builtin(spec.image):
            inst.image_digest = image_digest or fake_digest(spec.image)
        await self._put(inst, InstanceState.INSTANCE_STATE_CREATING)
        await self._end(outcome, failed=inst)
        if target == StartTarget.START_TARGET_SNAPSHOT:
            if self.etcd is not None:
                await self.etcd.delete(keys.instance_key(node.name, instance_id))
            inst.state = InstanceState.INSTANCE_STATE_ENDED
            return inst
        if target == StartTarget.START_TARGET_STANDBY:
            return await self._put(inst, InstanceState.INSTANCE_STATE_STANDBY)
        inst.endpoint = f"127.0.0.1:{9000 + len(self.calls)}"
        return await self._put(inst, InstanceState.INSTANCE_STATE_RUNNING)

    async def restore(self, node: Node, instance_id: str, gpu_index: int, timeout_s: float) -> Instance:
        outcome = await self._begin("restore", node, instance_id)
        inst = await self._stored(node, instance_id)
        if self.etcd is not None and inst.state != InstanceState.INSTANCE_STATE_STANDBY:
            raise errors.StartFailed(f"node {node.name}: instance {instance_id} is {InstanceState.Name(inst.state)}, not STANDBY")
        inst.gpu_index = gpu_index
        await self._put(inst, InstanceState.INSTANCE_STATE_RESTORING)
        await self._end(outcome, failed=inst)
        return await self._put(inst, InstanceState.INSTANCE_STATE_RUNNING)

    async def suspend(self, node: Node, instance_id: str) -> Instance:
        outcome = await self._begin("suspend", node, instance_id)
        inst = await self._stored(node, instance_id)
        await self._end(outcome)
        if self.etcd is not None and inst.state not in (InstanceState.INSTANCE_STATE_RUNNING, InstanceState.INSTANCE_STATE_IDLE):
            raise errors.FailedPrecondition(f"instance {instance_id} is {InstanceState.Name(inst.state)}, not IDLE")
        return await self._put(inst, InstanceState.INSTANCE_STATE_STANDBY)

    async def stop(self, node: Node, instance_id: str) -> None:
        await self._end(await self._begin("stop", node, instance_id))
        if self.etcd is not None:
            await self.etcd.delete(keys.instance_key(node.name, instance_id))

    async def logs(self, node: Node, instance_id: str, tail_bytes: int) -> str:
        await self._end(await self._begin("logs", node, instance_id))
        return f"logs of {instance_id} on {node.name}"

    async def close(self) -> None:
        self.closed = True
