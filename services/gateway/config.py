"""The gateway's configuration, loaded once in ``__main__`` through ``snapwake.config.load``."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

from snapwake.config import parse_address

__all__ = ["GatewayConfig", "parse_api_keys"]


def parse_api_keys(entries: tuple[str, ...]) -> dict[str, str]:
    """``("key:tenant", ...)`` to ``{key: tenant}``; raises ``ValueError`` naming the bad entry."""
    keys: dict[str, str] = {}
    for entry in entries:
        key, sep, tenant = entry.partition(":")
        if not sep or not key or not tenant:
            # Never echo the whole entry: it holds a secret.
            raise ValueError(f"api_keys entry #{len(keys) + 1} must be key:tenant")
        keys[key] = tenant
    return keys


T = TypeVar("T")


def _field(default: T, help: str) -> T:
    """A dataclass field whose help text shows up in ``--help``."""
    return field(default=default, metadata={"help": help})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class GatewayConfig:
    """Snapwake gateway: OpenAI REST API in front of the scheduler's claims."""

    listen: str = _field("127.0.0.1:8000", "host:port the HTTP server listens on.")
    scheduler: tuple[str, ...] = _field(
        ("127.0.0.1:7001",), "Scheduler gRPC addresses (host:port,...); the leader is found by trying each.")
    api_keys: tuple[str, ...] = _field(
        (), "API keys as key:tenant,...; none configured turns auth off (tenant 'default').")
    gateway_id: str = _field("", "This gateway's id for claims and queue reports; random when empty.")
    connect_timeout: float = _field(5.0, "Seconds to connect to an instance.")
    read_timeout: float = _field(
        600.0, "Seconds to wait between bytes from an instance (a long generation stays inside it).")
    rpc_timeout: float = _field(5.0, "Deadline of scheduler calls other than AcquireClaim.")
    leader_wait: float = _field(
        10.0, "Seconds calls wait for a scheduler leader (an election) before 503 with Retry-After; "
              "once that long without one, calls fail at once until a leader answers again.")
    default_queue_len: int = _field(64, "Queue length for functions whose policy sets 0.")
    default_queue_timeout: float = _field(
        60.0, "Queue timeout (s) for functions whose policy sets none.")
    models_cache_seconds: float = _field(1.5, "How long ListFunctions answers are reused.")
    report_interval: float = _field(1.0, "Seconds between queue-depth reports to the scheduler.")
    retry_after: int = _field(1, "Seconds sent in Retry-After with 429 and 503.")
    max_body_bytes: int = _field(16 << 20, "Largest request body accepted (413 above it), for every function.")
    shutdown_grace: float = _field(30.0, "Seconds in-flight requests get to finish on shutdown.")
    log_level: str = _field("INFO", "Log level.")

    def validate(self) -> list[str]:
        """Every problem, each naming its key (called by ``snapwake.config.load``)."""
        errors: list[str] = []
        try:
            parse_address(self.listen)
        except ValueError as exc:
            errors.append(f"listen: {exc}")
        if not self.scheduler:
            errors.append("scheduler: at least one address is required")
        for address in self.scheduler:
            try:
                parse_address(address)
            except ValueError as exc:
                errors.append(f"scheduler: {exc}")
        try:
            parse_api_keys(self.api_keys)
        except ValueError as exc:
            errors.append(str(exc))
        for name in ("connect_timeout", "read_timeout", "rpc_timeout", "leader_wait", "default_queue_timeout",
                     "models_cache_seconds", "report_interval", "shutdown_grace"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.default_queue_len < 1:
            errors.append(f"default_queue_len: must be >= 1, got {self.default_queue_len}")
        if self.max_body_bytes < 1:
            errors.append(f"max_body_bytes: must be >= 1, got {self.max_body_bytes}")
        if self.retry_after < 0:
            errors.append(f"retry_after: must be >= 0, got {self.retry_after}")
        return errors

    @property
    def keys(self) -> dict[str, str]:
        """API key to tenant."""
        return parse_api_keys(self.api_keys)

    def with_gateway_id(self) -> GatewayConfig:
        """This config with a random ``gateway_id`` filled in when none was set."""
        if self.gateway_id:
            return self
        return dataclasses.replace(self, gateway_id="gw-" + uuid.uuid4().hex[:12])
