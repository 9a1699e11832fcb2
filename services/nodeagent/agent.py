"""The node: its etcd registration under a lease, its live instances and the reconcile loop.

Actual state is reported to etcd, never cached as truth: every instance write goes through
this node's lease, so a dead nodeagent's keys vanish by themselves. On start the agent removes
what a previous run left behind (containers under its runc root, instance dirs, instance keys).
The per-request flows (start, restore, suspend, stop) are in ``operations.py``. The agent also
keeps the one check of host memory before a whole-process standby is made (``hostmem``).

Each reconcile pass moves serving instances RUNNING <-> IDLE (``machine.activity_move``) by
their requests in flight: the model server's count from its control socket, or, for a user
image, whether bytes moved through its listener lately (``machine.traffic_inflight``).

A standby parked longer than ``cold_standby_after_s`` is paged out to swap, one at a time, off
the event loop (``coldstandby``; ``cold_pass``): the cold tier.

A node whose lease is gone (by its own clock) fences itself and rejoins once etcd answers
again (``fencing``): meanwhile it takes no new work and writes nothing to etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from services.nodeagent import cgroups, coldstandby, fencing, handover, hostmem, logs, probe
from services.nodeagent.admission import DriverGate
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.container import cgroup_path, control_socket
from services.nodeagent.containers import Containers
from services.nodeagent.forward import Forwarder, TelemetryRelay
from services.nodeagent.gpu import Checkpointer, NodeGpus
from services.nodeagent.gpu import memory as gpumem
from services.nodeagent.machine import InstanceMachine, activity_move, traffic_inflight
from services.nodeagent.usertypes import ImageSource, Sandbox
from snapwake import errors, keys, telemetry
from snapwake.etcd import EtcdClient, LeaseKeeper
from snapwake.grpcclient import call, channel
from snapwake.lifecycle import SERVING
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc, types_pb2
from snapwake.v1.types_pb2 import InstanceState

__all__ = ["Live", "NodeAgent"]

log = logging.getLogger(__name__)


@dataclass
class Live:
    """One instance this node runs (or ran, until its key lingers out)."""

    machine: InstanceMachine
    container_id: str
    dir: Path
    # The port the instance listens on inside its network namespace.
    port: int
    gpu: bool
    pid: int = 0
    # The host listener that carries connections to ``port`` (its endpoint is the instance's).
    forwarder: Forwarder | None = None
    # Its traces' way out of the network namespace (None when the node exports no traces).
    relay: TelemetryRelay | None = None
    memory_limit: int = 0
    # SNAPSHOT_MODE_PROCESS: standby, restore and suspend are whole-process driver checkpoints.
    process_mode: bool = False
    # A user image: no control socket, reachable through the sandbox's forwarder, ready when
    # health_path answers 200 (the built-in model server's is /health too).
    user_image: bool = False
    health_path: str = "/health"
    # The container's processes the last driver checkpoint took (``Checkpointer.checkpoint_all``),
    # which the restore brings back; None before any checkpoint.
    cuda_pids: tuple[int, ...] | None = None
    # The image digest this instance holds in the node's image cache ("" when none): released
    # once, when its container goes.
    image_held: str = ""
    # GPU memory its processes held at the last reconcile pass that read it (NVML; ``gpu.memory``).
    gpu_memory_used: int = 0
    # What it was admitted with as a whole-process standby (``hostmem``): counted as its host
    # memory, at least, from the admission until it is restored; 0 otherwise.
    standby_host_bytes: int = 0
    # When it was last parked (the agent's clock; 0 while it is no standby), whether its
    # page-out to the cold tier was tried since, whether it is in that tier (``coldstandby``),
    # and the stop signal of a page-out under way (set once it is restored or stopped).
    standby_since: float = 0.0
    pageout_tried: bool = False
    cold: bool = False
    pageout_cancel: threading.Event | None = None
    # Serialises the flows on one instance; the reconcile loop skips a locked instance.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.machine.id

    @property
    def whole_process(self) -> bool:
        """Its driver checkpoint moves all its GPU memory into its host memory (PROCESS mode, and
        any user image: nothing in it releases its weights first)."""
        return self.process_mode or self.user_image

    @property
    def control_socket(self) -> Path:
        return control_socket(self.dir)

    @property
    def log_path(self) -> Path:
        return self.dir / "output.log"


class NodeAgent:
    """Owns this node's containers and its keys in etcd."""

    def __init__(self, config: NodeAgentConfig, etcd: EtcdClient, containers: Containers,
                 checkpointer: Checkpointer, gpus: list[types_pb2.Gpu], host_memory: int,
                 clock: Callable[[], float] = time.time, node_gpus: NodeGpus | None = None,
                 images: ImageSource | None = None, sandbox: Sandbox | None = None,
                 gpu_memory: gpumem.ProcessMemory | None = None) -> None:
        self.config, self.etcd, self.containers, self.checkpointer = config, etcd, containers, checkpointer
        self.gpus, self.host_memory, self.clock = gpus, host_memory, clock
        # The GPUs' device nodes and driver files containers are given (``gpu.devices``).
        self.node_gpus = node_gpus or NodeGpus()
        # User images (``userimage``): the image cache and the sandbox; None runs only the builtin.
        self.images, self.sandbox = images, sandbox
        # Per-process GPU memory for the slice watch (``gpu.memory``); by default NVML's, which
        # this agent then owns and shuts down.
        self._nvml: gpumem.NvmlProcessMemory | None = None
        if gpu_memory is None:
            gpu_memory = self._nvml = gpumem.NvmlProcessMemory()
        self.gpu_memory = gpumem.ProcessMemoryReader(gpu_memory)
        self.instances: dict[str, Live] = {}
        # Driver restores before checkpoints, each kind capped (``admission``).
        self.gate = DriverGate(config.max_concurrent_restores, config.max_concurrent_checkpoints)
        self.cached_snapshots: list[str] = []
        self.lease = LeaseKeeper(etcd, config.lease_ttl, on_lost=self._on_lease_lost,
                                 on_expired=self._on_lease_expired)
        self.standing = fencing.Standing.SERVING
        self.http = httpx.AsyncClient()
        self._blob_channel = channel(config.blobstore, config.client_tls(), server_role="blobstore")
        self._reconciler: asyncio.Task[None] | None = None
        self._registered_at = float("-inf")
        # The cold-standby tier (``coldstandby``): its one page-out at a time, where it reads
        # the node's swap devices, and whether it said it has none.
        self.cold_metrics = coldstandby.ColdStandbyMetrics()
        self.cold_metrics.cold.set_function(lambda: sum(live.cold for live in self.instances.values()))
        self.swaps_path = Path("/proc/swaps")
        self._pageout: asyncio.Task[None] | None = None
        self._no_swap_said = False

    def rootfs_path(self, instance_id: str) -> Path:
        """Where the instance's container gets its private root dir (``write_bundle``'s ``rootfs``)."""
        return self.config.rootfs_base / instance_id

    def private_paths(self) -> tuple[str, ...]:
        """Paths of this node that no model dir may be, hold or be inside of."""
        return self.config.state_dir, str(Path(self.config.handover_socket).parent), str(self.config.image_root)

    @property
    def blob_channel(self) -> grpc.aio.Channel:
        """The channel to this node's blobstore."""
        return self._blob_channel

    # --- life of the agent ---------------------------------------------------------------
    async def start(self) -> None:
        """Cleans up a previous run, takes the lease, registers the node, starts reconciling."""
        config = self.config
        config.instances_dir.mkdir(parents=True, exist_ok=True)
        _prepare_rootfs_base(config.rootfs_base, config.userns_base)
        await self.cleanup_orphans()
        await self.lease.start()
        await self.register()
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="reconcile")
        log.info("node %s registered (lease %x, %d GPUs)", config.name, self.lease.lease_id, len(self.gpus))

    async def stop(self) -> None:
        """Stops every container, then revokes the lease (which deletes our keys)."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        for live in self.instances.values():
            if live.pageout_cancel is not None:
                live.pageout_cancel.set()
        if self._pageout is not None:
            with contextlib.suppress(Exception):
                await self._pageout
        await asyncio.gather(*(self.destroy(live) for live in list(self.instances.values())),
                             return_exceptions=True)
        for live in list(self.instances.values()):
            shutil.rmtree(live.dir, ignore_errors=True)
            shutil.rmtree(self.rootfs_path(live.id), ignore_errors=True)
        self.instances.clear()
        with contextlib.suppress(OSError):  # empty now; a node that comes back makes it again
            self.config.rootfs_base.rmdir()
        await self.lease.stop(revoke=True)
        if self._nvml is not None:
            await asyncio.to_thread(self._nvml.close)
        await self.http.aclose()
        await self._blob_channel.close()

    async def cleanup_orphans(self) -> None:
        """Removes containers, instance dirs and keys a previous run of this node left behind."""
        for state in await self.containers.list():
            log.warning("removing orphan container %s (pid %d)", state.id, state.pid)
            await self.containers.kill(state.id)
            await self.containers.delete(state.id)
        for path in (*self.config.instances_dir.iterdir(), *self.config.rootfs_base.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        old = await self.etcd.get(keys.node_key(self.config.name), types_pb2.Node)
        if old is not None and old.lease:  # the old lease may still run for a few seconds
            await self.etcd.revoke_lease(old.lease)
        for entry in await self.etcd.list(keys.instance_prefix(self.config.name), types_pb2.Instance):
            await self.etcd.delete(entry.key, entry.mod_revision)

    # --- etcd ----------------------------------------------------------------------------
    def node_record(self) -> types_pb2.Node:
        node = types_pb2.Node(name=self.config.name, address=self.config.advertise_address,
                              blobstore_address=self.config.blobstore_advertise_address, host_memory_bytes=self.host_memory,
                              cached_snapshots=sorted(self.cached_snapshots))
        reserved: dict[int, int] = {}
        for live in self.instances.values():
            inst = live.machine.instance
            if live.gpu and live.machine.live and inst.state != InstanceState.INSTANCE_STATE_STANDBY:
                reserved[inst.gpu_index] = reserved.get(inst.gpu_index, 0) + inst.gpu_memory_bytes
        for gpu in self.gpus:
            copy = node.gpus.add()
            copy.CopyFrom(gpu)
            copy.memory_reserved_bytes = reserved.get(gpu.index, 0)
        node.heartbeat_time.FromNanoseconds(int(self.clock() * 1e9))
        return node

    def fenced(self) -> str:
        """Why the node takes no new work and writes nothing to etcd now; "" while it serves."""
        if self.standing is not fencing.Standing.SERVING:
            return f"its etcd lease is gone ({self.standing.value})"
        if not self.lease.held():
            return f"its etcd lease {self.lease.lease_id:x} is not held (etcd unreachable?)"
        return ""

    def check_serving(self) -> None:
        """Raises Unavailable naming the fence unless the node takes new work."""
        why = self.fenced()
        if why:
            raise errors.Unavailable(f"node {self.config.name} is fenced ({why}); it takes no new work "
                                     "until it has rejoined etcd")

    async def register(self) -> None:
        """Writes the node record under the lease (skipped while fenced: ``fencing.rejoin`` does)."""
        if not self.fenced():
            await self.write_node()

    async def write_node(self) -> None:
        await self.etcd.put(keys.node_key(self.config.name), self.node_record(), lease=self.lease.lease_id)
        self._registered_at = self.clock()

    async def publish(self, live: Live) -> None:
        """Writes the instance's actual state under this node's lease (skipped while fenced: the
        state stays here, and ``fencing.rejoin`` decides what etcd hears)."""
        if not self.fenced():
            await self.write_instance(live)

    async def write_instance(self, live: Live) -> None:
        await self.etcd.put(keys.instance_key(self.config.name, live.id), live.machine.instance, lease=self.lease.lease_id)

    async def move(self, live: Live, new: types_pb2.InstanceState, message: str = "") -> None:
        live.machine.move(new, self.clock(), message)
        inst = live.machine.instance
        if new in SERVING:  # restored (or never parked): the driver gave the GPU state back
            live.standby_host_bytes = 0
        if new == InstanceState.INSTANCE_STATE_STANDBY:  # parked: the cold tier's clock starts
            live.standby_since, live.pageout_tried, live.cold = self.clock(), False, False
            inst.standby_tier, inst.host_swap_bytes = types_pb2.STANDBY_TIER_HOT, 0
        else:
            live.standby_since = 0.0
            if live.pageout_cancel is not None:  # a restore does not wait for the page-out
                live.pageout_cancel.set()
            if new != InstanceState.INSTANCE_STATE_RESTORING:  # a restoring one still says its tier
                live.cold = False
                inst.standby_tier, inst.host_swap_bytes = types_pb2.STANDBY_TIER_UNSPECIFIED, 0
        await self.publish(live)
        if live.gpu:  # the node record's reserved GPU memory follows its instances
            await self.register()

    async def _on_lease_expired(self) -> None:
        await fencing.fence(self)

    async def _on_lease_lost(self) -> None:
        await fencing.rejoin(self)

    # --- containers ----------------------------------------------------------------------
    async def destroy(self, live: Live) -> None:
        """Closes its forwarder and its handover socket, kills and deletes the container
        (bounded) and lets go of its image; the instance dir stays for its logs."""
        if live.forwarder is not None:
            await live.forwarder.close()
        if live.relay is not None:
            await live.relay.close()
        if live.user_image and self.sandbox is not None:
            with contextlib.suppress(errors.SnapwakeError):
                await self.sandbox.release(live.id)
        with contextlib.suppress(errors.SnapwakeError):
            await self.containers.kill(live.container_id, "KILL")
        try:
            await self.containers.delete(live.container_id)
        except errors.SnapwakeError as exc:
            log.error("cannot delete container %s: %s", live.container_id, exc, extra={"instance_id": live.id})
        if live.image_held and self.images is not None:
            self.images.release(live.image_held)
            live.image_held = ""
        if not live.user_image:  # a user image is given no handover socket
            await handover.close_socket(self._blob_channel, live.id)

    async def exit_reason(self, live: Live, how: str = "exit status unknown") -> str:
        """Why a container that is gone went (read before it is deleted, with its cgroup);
        ``how`` is its exit status as the containers saw it."""
        if await asyncio.to_thread(cgroups.oom_kills, cgroup_path(self.config, live.id)):
            return f"out of memory (limit {live.memory_limit >> 20} MiB)"
        return f"container exited unexpectedly ({how})"

    async def fail(self, live: Live, reason: str) -> None:
        """Marks the instance FAILED with ``reason`` and removes its container."""
        log.warning("instance failed: %s", reason, extra={"instance_id": live.id})
        if live.machine.can_move(InstanceState.INSTANCE_STATE_FAILED):
            await self.move(live, InstanceState.INSTANCE_STATE_FAILED, reason[-2000:])
        await self.destroy(live)
        live.pid = 0

    async def end(self, live: Live, reason: str) -> None:
        """Stops an instance the node will not keep, which did nothing wrong: ENDED with
        ``reason`` (a FAILED one would count towards its revision's crash loop)."""
        log.info("instance ended: %s", reason, extra={"instance_id": live.id})
        if live.machine.can_move(InstanceState.INSTANCE_STATE_STOPPING):
            await self.move(live, InstanceState.INSTANCE_STATE_STOPPING)
        await self.destroy(live)
        live.pid = 0
        if live.machine.can_move(InstanceState.INSTANCE_STATE_ENDED):
            await self.move(live, InstanceState.INSTANCE_STATE_ENDED, reason[-2000:])

    async def forget(self, live: Live) -> None:
        """Deletes the key and the instance dir of an instance that is over."""
        self.instances.pop(live.id, None)
        with contextlib.suppress(Exception):
            await self.etcd.delete(keys.instance_key(self.config.name, live.id))
        shutil.rmtree(live.dir, ignore_errors=True)
        shutil.rmtree(self.rootfs_path(live.id), ignore_errors=True)

    async def checkpoint(self, live: Live, limit_s: float, *, standby: bool = True) -> None:
        """The driver checkpoint of a parked or new standby, in one of the node's checkpoint slots
        (``admission``); waiting longer than ``limit_s`` for one raises DeadlineExceeded. A
        whole-process standby must first fit in host memory (``admit_standby``); ``standby``
        is False for the deploy validation's checkpoint, whose container ends right after."""
        if standby and live.whole_process:
            await self.admit_standby(live)
        try:
            async with telemetry.traced("driver_checkpoint") as span, self.gate.checkpoint(limit_s) as waited:
                span.set_attribute("snapwake.driver_gate.wait_seconds", waited)
                pids = await self.containers.pids(live.container_id) or [live.pid]
                live.cuda_pids = await self.checkpointer.checkpoint_all(pids)
                span.set_attribute("snapwake.checkpoint.pids", len(live.cuda_pids))
        except BaseException:
            live.standby_host_bytes = 0  # no standby made (its flow fails or ends it)
            raise

    # --- host memory (``hostmem``) --------------------------------------------------------
    def host_memory_held(self, exclude: str = "") -> list[hostmem.Held]:
        """What each live instance but ``exclude`` holds in host memory."""
        return [hostmem.Held(hostmem.measured(live.machine.instance.host_rss_bytes,
                                              live.machine.instance.host_pss_bytes), live.standby_host_bytes)
                for live in self.instances.values() if live.machine.live and live.id != exclude]

    def standby_room(self, instance_id: str, need: int) -> hostmem.Admission:
        """The host memory rule for a whole-process standby of ``instance_id`` needing ``need``
        bytes; raises ``HostMemoryFull`` naming the numbers when it does not fit."""
        admission = hostmem.admit(need, self.host_memory_held(exclude=instance_id), self.host_memory,
                                  self.config.standby_host_memory_fraction)
        if not admission.ok:
            log.warning("%s", admission.refusal(instance_id), extra={"instance_id": instance_id})
            raise hostmem.HostMemoryFull(admission.refusal(instance_id))
        return admission

    async def admit_standby(self, live: Live) -> None:
        """Admits ``live``'s coming checkpoint as a whole-process standby (its GPU slice plus its
        container's RSS now) and counts it from here on; raises ``HostMemoryFull`` when the node's
        host memory does not allow it, leaving the instance as it is."""
        rss = await self._container_rss(live)
        # Nothing awaits between the sum and the mark: two admissions cannot both take the room.
        admission = self.standby_room(live.id, hostmem.standby_need(live.machine.instance.gpu_memory_bytes, rss))
        live.standby_host_bytes = admission.need
        log.info("standby admitted: ~%.1f GiB beside %.1f GiB of %.1f GiB", admission.need / (1 << 30),
                 admission.committed / (1 << 30), admission.limit / (1 << 30), extra={"instance_id": live.id})

    async def _container_rss(self, live: Live) -> int:
        """The host RSS of every process in the container (its first alone when they cannot be
        listed)."""
        pids: list[int] = []
        with contextlib.suppress(errors.SnapwakeError):
            pids = await self.containers.pids(live.container_id)
        return await asyncio.to_thread(lambda: sum(probe.host_memory(pid).rss for pid in pids or [live.pid]))

    # --- reconcile -----------------------------------------------------------------------
    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval)
            try:
                await self.reconcile_once()
            except Exception:  # noqa: BLE001 - keep reconciling; etcd or runc may be back next pass
                log.exception("reconcile pass failed")

    async def reconcile_once(self) -> None:
        """One pass: dead containers, GPU memory over a slice, RUNNING/IDLE, RSS, expired keys,
        the blobstore's cache."""
        # One NVML read for the whole pass, and none while no instance is watched.
        watched = any(self._gpu_watched(live) for live in self.instances.values())
        gpu_usage = await self.gpu_memory.read() if watched else None
        for live in list(self.instances.values()):
            if live.lock.locked():
                continue
            async with live.lock:
                await self._reconcile_instance(live, gpu_usage)
        await self.cold_pass()
        await self._poll_blobstore()
        # The heartbeat: schedulers stop placing on a node whose record has not been
        # rewritten lately, even while its etcd lease is alive (a stuck agent).
        if self.clock() - self._registered_at >= self.config.heartbeat_interval:
            await self.register()

    async def _reconcile_instance(self, live: Live, gpu_usage: Mapping[int, int] | None = None) -> None:
        machine = live.machine
        if machine.expired(self.clock(), self.config.ended_linger):
            await self.forget(live)
            return
        if not machine.live:
            return
        state = await self.containers.state(live.container_id)
        if state is None or not state.alive:
            # Reported once, FAILED: the scheduler counts it against the revision's crash loop.
            how = state.ended() if state is not None else "exit status unknown"
            await self.fail(live, await self.exit_reason(live, how) + "; output:\n" + logs.tail(live.log_path, 1500))
            return
        if gpu_usage is not None and self._gpu_watched(live) and await self._over_gpu_slice(live, gpu_usage):
            return
        changed = False
        if machine.state in SERVING:
            inflight = await self.inflight(live)
            new = None if inflight is None else activity_move(machine.state, inflight)
            if new is not None:
                machine.move(new, self.clock())
                changed = True
        if _note_memory(machine.instance, await asyncio.to_thread(probe.host_memory, live.pid)):
            changed = True
        if changed:
            await self.publish(live)

    # --- the cold-standby tier (``coldstandby``) -------------------------------------------
    def cold_due(self) -> list[Live]:
        """Standbys parked past ``cold_standby_after_s`` and not tried since, holding at least
        ``cold_standby_min_bytes`` (as last measured), oldest first."""
        now, config = self.clock(), self.config
        due = [live for live in self.instances.values()
               if live.machine.state == InstanceState.INSTANCE_STATE_STANDBY and not live.pageout_tried
               and not live.lock.locked() and coldstandby.due(live.standby_since, now, config.cold_standby_after_s)
               and hostmem.measured(live.machine.instance.host_rss_bytes, live.machine.instance.host_pss_bytes)
               >= config.cold_standby_min_bytes]
        return sorted(due, key=lambda live: live.standby_since)

    def swap_ready(self) -> bool:
        """Whether the node has a swap device to page standbys out to (said once when not)."""
        try:
            devices = coldstandby.swap_devices(self.swaps_path.read_text())
        except OSError as exc:
            devices, why = 0, f"{self.swaps_path} unreadable ({exc.strerror or exc})"
        else:
            why = f"{self.swaps_path} lists no swap device"
        if devices == 0 and not self._no_swap_said:
            log.warning("cold standbys off: %s; standbys stay in host memory (swapon a device to use "
                        "cold_standby_after_s)", why)
            self._no_swap_said = True
        return devices > 0

    async def cold_pass(self) -> None:
        """Starts the page-out of the standby longest due for the cold tier, unless one is under
        way, the tier is off or the node has no swap."""
        if self.config.cold_standby_after_s <= 0 or (self._pageout is not None and not self._pageout.done()):
            return
        due = self.cold_due()
        if due and self.swap_ready():
            live = due[0]
            # Its stop signal exists before the task runs: a restore from here on sets it.
            live.pageout_cancel, live.pageout_tried = threading.Event(), True
            self._pageout = asyncio.create_task(self.page_out(live, live.pageout_cancel), name=f"pageout-{live.id}")

    async def page_out(self, live: Live, cancel: threading.Event) -> None:
        """Pages ``live``'s container out to swap (off the event loop; stops once ``cancel`` is
        set, as a restore does) and, when that worked, counts it as cold at what it keeps
        resident. Never raises."""
        metrics, extra = self.cold_metrics, {"instance_id": live.id}
        try:
            if cancel.is_set():
                metrics.pageouts.labels("cancelled").inc()
                return
            try:
                pids = await self.containers.pids(live.container_id) or [live.pid]
            except errors.SnapwakeError:
                pids = [live.pid]
            # runc's containers have their own cgroup: a pid reused since it was listed is not in it.
            cgroup = cgroup_path(self.config, live.id) if self.config.containers == "runc" else ""
            result = await asyncio.to_thread(coldstandby.page_out_all, pids, cancel, cgroup)
            if result.errors:
                log.warning("page-out: refused calls %s", result.errors, extra=extra)
            if result.cancelled or cancel.is_set():
                metrics.pageouts.labels("cancelled").inc()
                log.info("page-out stopped after %.2fs: the standby left its tier", result.seconds, extra=extra)
                return
            if result.advised_bytes == 0:
                metrics.pageouts.labels("error").inc()
                log.warning("page-out moved nothing (%d processes, %d ranges); it stays hot",
                            result.processes, result.ranges, extra=extra)
                return
            mems = await asyncio.to_thread(lambda: [coldstandby.read_smaps(pid) for pid in pids])
            first = await asyncio.to_thread(probe.host_memory, live.pid)
            if cancel.is_set() or live.machine.state != InstanceState.INSTANCE_STATE_STANDBY:
                metrics.pageouts.labels("cancelled").inc()
                return
            inst = live.machine.instance
            resident, swapped = sum(m.pss for m in mems), sum(m.swap_pss for m in mems)
            live.cold = True
            # hostmem counts it at what it keeps resident from here on, not its admission estimate.
            live.standby_host_bytes = resident
            inst.standby_tier, inst.host_swap_bytes = types_pb2.STANDBY_TIER_COLD, swapped
            inst.host_rss_bytes, inst.host_pss_bytes, inst.host_private_bytes = first
            metrics.pageouts.labels("ok").inc()
            metrics.pageout_bytes.inc(result.advised_bytes)
            log.info("standby paged out in %.2fs: %d MiB resident, %d MiB in swap (%d processes)", result.seconds,
                     resident >> 20, swapped >> 20, result.processes, extra=extra)
            await self.publish(live)
        except Exception:  # noqa: BLE001 - the standby stays as it was, hot
            metrics.pageouts.labels("error").inc()
            log.exception("page-out failed; the standby stays hot", extra=extra)
        finally:
            if live.pageout_cancel is cancel:
                live.pageout_cancel = None

    def _gpu_watched(self, live: Live) -> bool:
        """Whether the slice watch applies: a serving GPU instance with a slice (``gpu.memory``)."""
        return (self.config.gpu_memory_watch and live.gpu and live.machine.state in gpumem.WATCHED
                and live.machine.instance.gpu_memory_bytes > 0)

    async def _over_gpu_slice(self, live: Live, usage: Mapping[int, int]) -> bool:
        """Records what the container's processes hold on the GPU; over the instance's limit, it
        is FAILED and its container removed (True)."""
        inst = live.machine.instance
        limit = gpumem.SliceLimit.of(inst.gpu_memory_bytes, live.user_image,
                                         self.config.gpu_memory_builtin_allowance_bytes)
        try:
            pids = await self.containers.pids(live.container_id)
        except errors.SnapwakeError as exc:  # runc ps failed: judged next pass
            log.warning("cannot list the container's processes: %s", exc.message, extra={"instance_id": live.id})
            return False
        live.gpu_memory_used = used = gpumem.used_by(pids, usage)
        log.debug("GPU memory: %d MiB, slice %d MiB", used >> 20, inst.gpu_memory_bytes >> 20,
                  extra={"instance_id": live.id})
        if not limit.over(used):
            return False
        await self.fail(live, limit.reason(used, inst.gpu_index))
        return True
    async def inflight(self, live: Live) -> int | None:
        """Requests in flight on a serving instance, None when unknown: the model server's count
        from its control socket; for a user image, which has none, 1 or 0 from its listener's
        traffic (``machine.traffic_inflight`` says why that is safe)."""
        if not live.user_image:
            try:
                status = await probe.control(live.control_socket, {"op": "status"}, 2.0)
            except errors.SnapwakeError:
                return None
            return int(status.get("inflight", 0))
        traffic = self.sandbox.traffic(live.id) if self.sandbox is not None else None
        if traffic is None:
            return None
        return traffic_inflight(time.monotonic() - traffic.last_moved, self.config.user_idle_quiet_s)

    async def _poll_blobstore(self) -> None:
        stub = blobstore_pb2_grpc.BlobstoreServiceStub(self._blob_channel)
        try:
            resp = await call(stub.ListSnapshots, blobstore_pb2.BlobstoreServiceListSnapshotsRequest(), timeout=2.0)
        except errors.SnapwakeError as exc:
            log.debug("blobstore %s: %s", self.config.blobstore, exc.message)
            return
        cached = sorted(s.manifest.snapshot_id for s in resp.snapshots if s.in_cache and s.manifest.snapshot_id)
        if cached != sorted(self.cached_snapshots):
            self.cached_snapshots = cached
            await self.register()


def _prepare_rootfs_base(base: Path, container_gid: int) -> None:
    """Makes the node's root-dir base: runc mounts a container's root dir as the container's
    (unprivileged) root, which must be able to walk there (the base lets only that group in),
    and nobody but us may write on the way (a dir someone else owns or can write could swap what
    the container sees)."""
    base.mkdir(mode=0o710, parents=True, exist_ok=True)
    os.chown(base, os.geteuid(), container_gid)
    base.chmod(0o710)
    for path in base.parents:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or st.st_mode & 0o001 == 0:
            raise errors.Unavailable(f"rootfs_dir: {path} must be a directory searchable by others (o+x)")
        if path == base.parent and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            raise errors.Unavailable(f"rootfs_dir: {path} must be ours and writable by nobody else")


def _note_memory(inst: types_pb2.Instance, mem: probe.HostMemory) -> bool:
    """Records ``mem`` on the instance when a number moved by more than 16 MiB (so the etcd
    record is not rewritten for every page); True when it did."""
    old = (inst.host_rss_bytes, inst.host_pss_bytes, inst.host_private_bytes)
    if all(abs(new - was) <= (16 << 20) for new, was in zip(mem, old, strict=True)):
        return False
    inst.host_rss_bytes, inst.host_pss_bytes, inst.host_private_bytes = mem
    return True
