"""Frozen, validated configuration loaded once in each service's ``__main__``.

A config class is a frozen dataclass whose fields carry ``metadata={"help": ...}``. ``load``
reads every field from command-line flags, then ``SNAPWAKE_<FIELD>`` environment variables,
then the default, and reports every bad key by name in one ``ConfigError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["ConfigError", "is_wildcard", "load", "parse_address", "parse_endpoints"]

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration keys are invalid; the message names each of them."""


def parse_address(value: str) -> tuple[str, int]:
    """Splits ``host:port``; raises ``ValueError`` naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means "every address" (0.0.0.0, ::): fine to listen on, never an
    address to advertise, since another host dialling it reaches itself."""
    return host.strip("[]") in ("0.0.0.0", "::", "")


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """Splits ``host:port[,host:port...]`` (etcd's members, say); raises ``ValueError`` naming
    the bad entry, or when there is none. An IPv6 host may be bracketed: ``[::1]:2379``."""
    members = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, port = parse_address(entry)
        members.append((host[1:-1] if host.startswith("[") and host.endswith("]") else host, port))
    if not members:
        raise ValueError(f"expected host:port[,host:port...], got {value!r}")
    return members


def _convert(raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if raw == "" else _convert(raw, inner[0])
    if origin in (tuple, list):
        (item, *_) = typing.get_args(kind) or (str,)
        return tuple(_convert(p.strip(), item) for p in raw.split(",") if p.strip())
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if kind in (int, float):
        return kind(raw)
    return raw


def load(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         prog: str | None = None) -> T:
    """Builds ``cls`` from flags, then ``SNAPWAKE_*`` variables, then defaults."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for f in fields:
        # A boolean flag alone means true (``--dev-plaintext``); ``--flag off`` still works.
        flag: dict[str, Any] = {"nargs": "?", "const": "true"} if hints[f.name] is bool else {}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f.metadata.get("help", ""), **flag)
    ns = parser.parse_args(list(argv) if argv is not None else None)
    values: dict[str, Any] = {}
    errors: list[str] = []
    for f in fields:
        raw = getattr(ns, f.name)
        source = f"--{f.name.replace('_', '-')}"
        if raw is None:
            source = "SNAPWAKE_" + f.name.upper()
            raw = env.get(source)
        if raw is None:
            continue
        try:
            values[f.name] = _convert(raw, hints[f.name])
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as exc:
        errors.append(str(exc))
        obj = None
    if obj is not None and hasattr(obj, "validate"):
        errors.extend(obj.validate())
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))
    return obj  # type: ignore[return-value]
