"""Scheduler configuration: flags, then ``SNAPWAKE_*`` variables, then these defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from snapwake.config import EtcdTlsConfig, parse_address, parse_endpoints

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig(EtcdTlsConfig):
    """Snapwake scheduler: admin API, claims, placement and autoscaling."""

    listen: str = field(default="127.0.0.1:7001", metadata={"help": "gRPC listen address host:port"})
    advertise: str = field(default="", metadata={
        "help": "address other processes reach this scheduler at (default: the listen address)"})
    etcd: str = field(default="127.0.0.1:2379", metadata={
        "help": "etcd members' client addresses, host:port[,host:port...] (every member of a cluster)"})
    election_ttl_s: int = field(default=5, metadata={"help": "leader lease TTL in seconds"})
    claim_ttl_s: float = field(default=600.0, metadata={
        "help": "how long a gateway's instance claim lives unless released (bounds one request)"})
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
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    metrics_port: int = field(default=0, metadata={"help": "port serving Prometheus /metrics (0: off)"})

    def validate(self) -> list[str]:
        problems = []
        for name in ("listen", "etcd") + (("advertise",) if self.advertise else ()):
            try:
                (parse_endpoints if name == "etcd" else parse_address)(getattr(self, name))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        problems.extend(self.etcd_tls_problems())
        for name in ("election_ttl_s", "claim_ttl_s", "node_rpc_timeout_s", "node_stale_s",
                     "reconcile_interval_s", "snapshot_attempts", "crash_loop_limit", "crash_loop_window_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive")
        if self.claim_adopt_grace_s < 0:
            problems.append("claim_adopt_grace_s: must not be negative")
        if not 0 <= self.metrics_port < 65536:
            problems.append(f"metrics_port: out of range: {self.metrics_port}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"log_level: unknown level {self.log_level!r}")
        return problems
