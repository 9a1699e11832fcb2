"""The gateway's configuration, loaded once in ``__main__`` through ``snapwake.config.load``."""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from services.gateway.keys import KeyStore
from services.gateway.limits import EdgeLimits
from snapwake.authz import GATEWAY_ID_SEPARATOR, gateway_id_problem
from snapwake.config import parse_address
from snapwake.credentials import load_secret
from snapwake.tlsconfig import TlsSettings

__all__ = ["GatewayConfig", "parse_api_keys"]


def parse_api_keys(entries: tuple[str, ...], what: str = "api_keys") -> KeyStore:
    """``("sha256:<hex>:tenant" or "key:tenant", ...)`` to a ``KeyStore`` (``services.gateway.keys``);
    raises ``ValueError`` naming the bad entry by position (never its text: it may hold a key)."""
    return KeyStore.parse(entries, what)


T = TypeVar("T")


def _field(default: T, help: str) -> T:
    """A dataclass field whose help text shows up in ``--help``."""
    return field(default=default, metadata={"help": help})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class GatewayConfig(TlsSettings):
    """Snapwake gateway: OpenAI REST API in front of the scheduler's claims."""

    listen: str = _field("127.0.0.1:8000", "host:port the HTTP server listens on.")
    scheduler: tuple[str, ...] = _field(
        ("127.0.0.1:7001",), "Scheduler gRPC addresses (host:port,...); the leader is found by trying each.")
    api_keys: tuple[str, ...] = _field(
        (), "API keys as sha256:<hex digest of the key>:tenant,... (python -m services.gateway.keys new TENANT); "
            "key:tenant (the key itself) is accepted for development only. None configured turns auth off "
            "(tenant 'default').")
    operator_keys: tuple[str, ...] = _field(
        (), "Operator keys (same forms as api_keys; the tenant part names the operator): the only keys "
            "/metrics accepts. With api_keys set and none here, /metrics answers nobody.")
    tls_certfile: str = _field("", "PEM certificate (chain) to serve HTTPS with; with tls_keyfile. Empty: plain HTTP.")
    tls_keyfile: str = _field("", "PEM private key of tls_certfile.")
    api_key_secret_file: str = _field(
        "", "File holding the scheduler's API-key secret (its api_key_secret_file): turns on the keys made through "
            "the admin API (snapwake apikey create), checked as HMAC-SHA256 under it.")
    api_key_refresh: float = _field(
        2.0, "Seconds between refreshes of the admin API's keys: a created or revoked key counts within this.")
    admin_token_file: str = _field(
        "", "File holding the admin bearer token sent on the scheduler's SchedulerService calls (the function "
            "list, the dashboard) when the scheduler runs with admin_auth.")
    gateway_id: str = _field(
        "", "This gateway's id for claims and queue reports. With a certificate it must be the certificate's "
            "name or NAME:SUFFIX (the scheduler refuses any other); empty: NAME:<random> (gw-<random> without TLS).")
    connect_timeout: float = _field(5.0, "Seconds to connect to an instance.")
    read_timeout: float = _field(
        600.0, "Seconds to wait between bytes from an instance (a long generation stays inside it).")
    dead_node_timeout: float = _field(
        20.0, "Seconds an instance's node may answer nothing on a connection (TCP keepalive, unacknowledged "
              "bytes) before it fails: a request on a node whose link went down moves or ends after this.")
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
    max_messages: int = _field(2048, "Most entries in messages (400 above it); 0: no cap.")
    max_prompt_chars: int = _field(
        2_000_000, "Most characters of text in messages, or in prompt (token ids count one each); 400 above; 0: no cap.")
    max_tokens_cap: int = _field(
        131072, "Largest max_tokens / max_completion_tokens accepted (400 above it, never lowered); 0: no cap.")
    max_n: int = _field(16, "Largest n accepted (400 above it; the built-in model server shares the prefill among them); 0: no cap.")
    rate_limit_rps: float = _field(
        50.0, "Requests per second per API key, in this gateway replica (429 above it); 0: no limit.")
    rate_limit_burst: int = _field(100, "Requests an idle API key may send at once before rate_limit_rps applies.")
    max_in_flight_per_key: int = _field(
        256, "Requests one API key may have in flight in this gateway replica (429 above it); 0: no cap.")
    shutdown_grace: float = _field(30.0, "Seconds in-flight requests get to finish on shutdown.")
    log_level: str = _field("INFO", "Log level.")

    def validate(self) -> list[str]:
        """Every problem, each naming its key (called by ``snapwake.config.load``)."""
        errors: list[str] = self.tls_problems("gateway")
        if self.gateway_id and not errors and (tls := self.server_tls()) is not None:
            problem = gateway_id_problem(tls.identity, self.gateway_id)
            if problem is not None:
                errors.append(f"gateway_id: {problem}")
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
        for what in ("api_keys", "operator_keys"):
            try:
                parse_api_keys(getattr(self, what), what)
            except ValueError as exc:
                errors.append(str(exc))
        if self.api_key_secret_file:
            try:
                load_secret(self.api_key_secret_file)
            except ValueError as exc:
                errors.append(str(exc))
        if self.admin_token_file:
            try:
                _ = self.admin_token
            except ValueError as exc:
                errors.append(str(exc))
        for name in ("api_key_refresh", "connect_timeout", "read_timeout", "dead_node_timeout", "rpc_timeout", "leader_wait", "default_queue_timeout",
                     "models_cache_seconds", "report_interval", "shutdown_grace"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.default_queue_len < 1:
            errors.append(f"default_queue_len: must be >= 1, got {self.default_queue_len}")
        if self.max_body_bytes < 1:
            errors.append(f"max_body_bytes: must be >= 1, got {self.max_body_bytes}")
        for name in ("max_messages", "max_prompt_chars", "max_tokens_cap", "max_n", "rate_limit_rps",
                     "max_in_flight_per_key"):
            if getattr(self, name) < 0:
                errors.append(f"{name}: must be >= 0 (0: off), got {getattr(self, name)}")
        if self.rate_limit_burst < 1:
            errors.append(f"rate_limit_burst: must be >= 1, got {self.rate_limit_burst}")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            errors.append("tls_certfile, tls_keyfile: set both (HTTPS) or neither (plain HTTP)")
        for name in ("tls_certfile", "tls_keyfile"):
            if getattr(self, name) and not os.access(getattr(self, name), os.R_OK):
                errors.append(f"{name}: cannot read {getattr(self, name)}")
        if self.retry_after < 0:
            errors.append(f"retry_after: must be >= 0, got {self.retry_after}")
        return errors

    @property
    def keys(self) -> KeyStore:
        """The API keys' digests and tenants."""
        return parse_api_keys(self.api_keys)

    @property
    def operators(self) -> KeyStore:
        """The operator keys' digests."""
        return parse_api_keys(self.operator_keys, "operator_keys")

    @property
    def admin_token(self) -> str:
        """The token in ``admin_token_file`` ("" without one); ValueError naming the key."""
        if not self.admin_token_file:
            return ""
        try:
            token = Path(self.admin_token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"admin_token_file: cannot read {self.admin_token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"admin_token_file: {self.admin_token_file} is empty")
        return token

    @property
    def edge_limits(self) -> EdgeLimits:
        return EdgeLimits(self.max_messages, self.max_prompt_chars, self.max_tokens_cap, self.max_n)

    def with_gateway_id(self) -> GatewayConfig:
        """This config with a random ``gateway_id`` filled in when none was set: under its
        certificate's name when it has one (``snapwake.authz.gateway_id_problem``)."""
        if self.gateway_id:
            return self
        tls = self.server_tls()
        prefix = tls.identity.name + GATEWAY_ID_SEPARATOR if tls is not None else "gw-"
        return dataclasses.replace(self, gateway_id=prefix + uuid.uuid4().hex[:12])
