"""The start of every service's ``main`` (and the model server's): config, logging and tracing, or
one line and exit 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TypeVar

from snapwake import log, telemetry
from snapwake.config import ConfigError, load
from snapwake.tlsconfig import TlsSettings

__all__ = ["bootstrap"]

T = TypeVar("T")


def bootstrap(cls: type[T], name: str, argv: Sequence[str] | None = None, *, prog: str | None = None) -> T:
    """Loads ``cls`` from flags and ``SNAPWAKE_*``, sets up logging as ``name`` and OTEL tracing
    as ``snapwake-<name>``; ``prog`` (for ``--help``) defaults to ``python -m services.<name>``.

    A bad key (or a bad ``OTEL_*`` setting) is printed as one line naming it, and the process
    exits with status 2: no stack trace for a configuration mistake."""
    try:
        cfg = load(cls, argv, prog=prog or f"python -m services.{name}")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    refusal = cfg.plaintext_refusal() if isinstance(cfg, TlsSettings) else None
    if refusal:
        print(refusal, file=sys.stderr)
        raise SystemExit(2)
    log.setup(name, getattr(cfg, "log_level", "INFO"))
    if getattr(cfg, "dev_plaintext", False):
        logging.getLogger(name).warning("dev_plaintext: serving and calling without TLS and without any "
                                        "authorization; for development only")
    try:
        telemetry.setup_tracing(f"snapwake-{name}")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    return cfg
