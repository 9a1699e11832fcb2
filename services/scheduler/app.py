"""Wires the scheduler together: etcd view, election, claim broker, controller, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from services.scheduler.access import Authenticator
from services.scheduler.api import ClaimServicer, SchedulerServicer
from services.scheduler.audit import AuditLog
from services.scheduler.bootstrap import read_token_file, register_operator_token
from services.scheduler.claims import ClaimBroker, QueueDepths
from services.scheduler.claimtable import ClaimTable
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.crashloop import CrashLoop
from services.scheduler.election import Election
from services.scheduler.nodes import NodeClient
from services.scheduler.quota import Limits, Quotas
from services.scheduler.snapshots import SnapshotBuilder
from services.scheduler.starter import Starter
from services.scheduler.state import ClusterState
from snapwake.aio import cancel_and_wait
from snapwake.credentials import load_secret
from snapwake.etcd import EtcdClient
from snapwake.grpcserver import GrpcServer
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)
SERVICES = [scheduler_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("SchedulerService", "ClaimService")]


class Scheduler:
    """One scheduler process. ``await start()``; ``port`` is the bound gRPC port."""

    def __init__(self, cfg: SchedulerConfig, etcd: EtcdClient) -> None:
        self.cfg, self.etcd = cfg, etcd
        self.state = ClusterState(etcd)
        tls = cfg.server_tls()
        self.nodes = NodeClient(cfg.node_rpc_timeout_s, tls.client() if tls else None)
        self.table = ClaimTable(time.monotonic, cfg.claim_ttl_s)
        self.queues = QueueDepths(time.monotonic)
        self.quotas = Quotas(Limits(cfg.quota_functions, cfg.quota_standbys, cfg.quota_snapshot_bytes,
                                    cfg.quota_gpu_memory_bytes), self.state.quota)
        self.starter = Starter(self.state, self.nodes, self.table, cfg.node_stale_s, self.quotas)
        self.broker = ClaimBroker(self.state, self.starter, self.table)
        self.controller = Controller(self.state, self.starter, self.broker, self.queues,
                                     SnapshotBuilder(self.state, self.starter, cfg.snapshot_attempts),
                                     cfg.reconcile_interval_s,
                                     CrashLoop(cfg.crash_loop_limit, cfg.crash_loop_window_s))
        # Admin callers (no client certificate) reach SchedulerService on admin_listen only; the
        # gateways' ClaimService needs their certificate (snapwake.authz).
        self.server = GrpcServer(cfg.listen, SERVICES, tls=tls, admin_bind=cfg.admin_listen,
                                 health_bind=cfg.health_listen, anonymous_services=SERVICES[:1])
        self.port = self.server.port
        self.admin_port = self.server.admin_port
        host = cfg.listen.rpartition(":")[0]
        self.address = cfg.advertise or f"{host}:{self.port}"
        self.election = Election(etcd, "sched-" + secrets.token_hex(4), self.address, cfg.election_ttl_s,
                                 self._elected, self._deposed)
        if not cfg.admin_auth:
            log.warning("admin_auth is off: anyone reaching %s may call every admin RPC as an operator", cfg.listen)
        self.audit = AuditLog(cfg.audit_log, cfg.audit_log_bytes, cfg.audit_log_backups)
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(self.state, self.nodes, self.election, Authenticator(etcd, cfg.admin_auth), self.audit,
                              self.quotas.defaults,
                              load_secret(cfg.api_key_secret_file) if cfg.api_key_secret_file else None),
            self.server.server)
        scheduler_pb2_grpc.add_ClaimServiceServicer_to_server(
            ClaimServicer(self.broker, self.queues, self.election), self.server.server)
        self._election_task: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[None] | None = None

    async def _elected(self) -> None:
        # The mirror is kept in sync whether or not we lead; only the leader's soft state
        # (claims, starts in flight) must start empty, since a past term's is stale. Claims
        # still held from that term come back with the gateways' reports: until the grace
        # window ends nothing is granted, and the controller (whose scale-in and cleanup read
        # claim counts) waits too.
        self.broker.reset()
        self.broker.settle(self.cfg.claim_adopt_grace_s)
        self._settling = asyncio.create_task(self._control_after(self.cfg.claim_adopt_grace_s),
                                             name="controller after grace")

    async def _control_after(self, grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        self.controller.start()

    async def _deposed(self) -> None:
        if self._settling is not None:
            await cancel_and_wait([self._settling], what="claim settling")
            self._settling = None
        await self.controller.stop()
        self.broker.reset()

    async def start(self) -> None:
        for path in self.cfg.admin_token_files:
            cred = read_token_file(path)
            if await register_operator_token(self.etcd, cred, f"bootstrap: {path}"):
                log.info("registered operator token %s from %s", cred.id, path)
        await self.state.start()
        await self.server.start()
        self._election_task = asyncio.create_task(self.election.run(), name="election")
        log.info("scheduler serving on %s (advertised %s)", self.cfg.listen, self.address)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Drains the server, resigns leadership so a standby takes over at once, closes clients."""
        await self.server.stop(grace_s)
        await cancel_and_wait([self._election_task], what="election")
        await self.election.resign()
        await self.controller.stop()
        await self.state.stop()
        await self.nodes.close()
        self.audit.close()
