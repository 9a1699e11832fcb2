"""Scheduler configuration: flags, then ``SNAPWAKE_*`` variables, then these defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.bootstrap import read_token_file
from snapwake.config import EtcdTlsConfig, parse_address, parse_endpoints
from snapwake.credentials import load_secret
from snapwake.tlsconfig import ServerSettings

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig(ServerSettings, EtcdTlsConfig):
    """Snapwake scheduler: admin API, claims, placement and autoscaling."""

    listen: str = field(default="127.0.0.1:7001", metadata={
        "help": "gRPC listen address host:port (mutual TLS: gateways' claims, with TLS configured)"})
    admin_listen: str = field(default="", metadata={
        "help": "host:port of the admin port: SchedulerService over TLS without a client certificate "
                "(CLI, grpcurl; bearer token); empty: none"})
    advertise: str = field(default="", metadata={
        "help": "address other processes reach this scheduler at (default: the listen address)"})
    etcd: str = field(default="127.0.0.1:2379", metadata={
        "help": "etcd members' client addresses, host:port[,host:port...] (every member of a cluster)"})
    election_ttl_s: int = field(default=5, metadata={"help": "leader lease TTL in seconds"})
    claim_ttl_s: float = field(default=5.0, metadata={
        "help": "a claim expires (its slot comes back) when its gateway neither releases it nor lists "
                "it in a report for this long: a few of the gateways' report_interval (1 s)"})
    claim_adopt_grace_s: float = field(default=2.0, metadata={
        "help": "after winning an election, grant and stop nothing for this long while gateways "
                "report the claims they hold (at least the gateways' report_interval plus margin)"})
    node_rpc_timeout_s: float = field(default=10.0, metadata={
        "help": "deadline of nodeagent calls, added to the function's start_timeout for starts"})
    node_stale_s: float = field(default=30.0, metadata={
        "help": "a node whose heartbeat is older than this gets no new instances"})
    reconcile_interval_s: float = field(default=1.0, metadata={"help": "controller loop period"})
    snapshot_attempts: int = field(default=3, metadata={"help": "snapshot builds before a function FAILS"})
    crash_loop_limit: int = field(default=5, metadata={
        "help": "failed instances of one revision within crash_loop_window_s before its function FAILS"})
    crash_loop_window_s: float = field(default=600.0, metadata={"help": "window of crash_loop_limit"})
    admin_auth: bool = field(default=False, metadata={
        "help": "require an admin bearer token (authorization: Bearer swt-...) on every SchedulerService call; "
                "off, anyone reaching the port is an operator (tests only; make run turns it on)"})
    audit_log: str = field(default="", metadata={
        "help": "file the admin audit log's JSON lines go to, rotated by size (empty: the service log)"})
    audit_log_bytes: int = field(default=10 << 20, metadata={"help": "audit log size before it is rotated"})
    audit_log_backups: int = field(default=5, metadata={"help": "rotated audit log files kept"})
    admin_token_files: tuple[str, ...] = field(default=(), metadata={
        "help": "files (a mounted Secret) each holding an operator token (python -m services.scheduler.bootstrap "
                "--generate), registered in etcd at start-up when it is not there yet: the first token of a "
                "compose or Kubernetes cluster, and the gateways' admin_token_file"})
    api_key_secret_file: str = field(default="", metadata={
        "help": "file holding the secret (32+ bytes) that keys the gateways' API-key digests; the gateways "
                "read the same file (empty: CreateApiKey is refused)"})
    quota_functions: int = field(default=0, metadata={"help": "default functions per tenant (0: no limit)"})
    quota_standbys: int = field(default=0, metadata={"help": "default standbys per tenant (0: no limit)"})
    quota_snapshot_bytes: int = field(default=0, metadata={
        "help": "default snapshot bytes per tenant (0: no limit)"})
    quota_gpu_memory_bytes: int = field(default=0, metadata={
        "help": "default GPU memory per tenant, the sum of its instances' slices (0: no limit)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    metrics_port: int = field(default=0, metadata={"help": "port serving Prometheus /metrics (0: off)"})

    def validate(self) -> list[str]:
        problems = []
        problems.extend(self.tls_problems("scheduler"))
        for name in ("listen", "etcd") + (("advertise",) if self.advertise else ()) + (
                ("admin_listen",) if self.admin_listen else ()):
            try:
                (parse_endpoints if name == "etcd" else parse_address)(getattr(self, name))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        problems.extend(self.etcd_tls_problems())
        for name in ("election_ttl_s", "claim_ttl_s", "node_rpc_timeout_s", "node_stale_s",
                     "reconcile_interval_s", "snapshot_attempts", "crash_loop_limit", "crash_loop_window_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive")
        for name in ("quota_functions", "quota_standbys", "quota_snapshot_bytes", "quota_gpu_memory_bytes",
                     "audit_log_backups"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must not be negative (0: no limit)")
        if self.audit_log_bytes <= 0:
            problems.append("audit_log_bytes: must be positive")
        if self.api_key_secret_file:
            try:
                load_secret(self.api_key_secret_file)
            except ValueError as exc:
                problems.append(str(exc))
        for path in self.admin_token_files:
            try:
                read_token_file(path)
            except ValueError as exc:
                problems.append(f"admin_token_files: {exc}")
        if self.claim_adopt_grace_s < 0:
            problems.append("claim_adopt_grace_s: must not be negative")
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"metrics_port: out of range: {self.metrics_port}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"log_level: unknown level {self.log_level!r}")
        return problems
