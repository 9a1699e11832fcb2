"""The admin audit log: one JSON line per admin change and per refused admin call.

A line says who (the token's id and tenant, never the token; and the peer address), what (the
method and the resource it named), when (UTC, ISO 8601) and the outcome (``OK`` or the gRPC
code's name, with the error message)::

    {"time": "2026-11-27T16:40:01.120Z", "token_id": "3f2a9c01d4e5", "tenant": "acme",
     "operator": false, "peer": "ipv4:127.0.0.1:53312", "method": "DeleteFunction",
     "resource": "acme/prod/chat", "outcome": "OK"}

Where: a file per scheduler process (``audit_log``), rotated at ``audit_log_bytes`` with
``audit_log_backups`` old files kept (``logging.handlers.RotatingFileHandler``), so disk use is
bounded. Not etcd: every refused call is written, so an attacker without a token could
otherwise fill etcd (whose size is capped and whose filling stops the whole cluster) just by
calling; a local file costs etcd nothing and is shipped by whatever ships the services' logs.
Only the leader answers admin calls, so the leader's file holds a term's changes. Without
``audit_log`` the lines go to the ``snapwake.audit`` logger, i.e. the service log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path

from services.scheduler.access import Caller

__all__ = ["AuditLog"]

_RESOURCE_CHARS = 300
_MESSAGE_CHARS = 500


class AuditLog:
    def __init__(self, path: str = "", max_bytes: int = 10 << 20, backups: int = 5) -> None:
        if path:
            # A logger object of our own (not from the registry): several schedulers in one
            # test process each keep their own file.
            self._log = logging.Logger("snapwake.audit", logging.INFO)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                           encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._log.addHandler(handler)
        else:
            self._log = logging.getLogger("snapwake.audit")
        self.path = path

    def record(self, caller: Caller | None, peer: str, method: str, resource: str, outcome: str,
               message: str = "") -> None:
        """Writes one line; ``caller`` None when authentication itself failed."""
        now = datetime.now(UTC)
        line: dict[str, object] = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"}
        line.update(caller.who() if caller is not None else {"token_id": None, "tenant": None, "operator": False})
        line.update(peer=peer, method=method, resource=resource[:_RESOURCE_CHARS], outcome=outcome)
        if message:
            line["message"] = message[:_MESSAGE_CHARS]
        self._log.info(json.dumps(line, ensure_ascii=True))

    def close(self) -> None:
        if self.path:
            for handler in list(self._log.handlers):
                handler.close()
                self._log.removeHandler(handler)
