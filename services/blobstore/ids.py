"""Snapshot ids: validation and their mapping to safe directory names."""

from __future__ import annotations

import re

from snapwake import errors
from snapwake.keys import split_snapshot_id

__all__ = ["check_function_id", "check_snapshot_id", "safe_name"]

_PART = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_snapshot_id(sid: str, field: str = "snapshot_id") -> str:
    """Returns ``sid`` if it is ``tenant/namespace/name@revision``; else InvalidArgument naming ``field``."""
    try:
        function_id, _rev = split_snapshot_id(sid)
    except ValueError as exc:
        raise errors.InvalidArgument(f"{field}: {exc}", field=field) from None
    for part in function_id.split("/"):
        if not _PART.fullmatch(part):
            raise errors.InvalidArgument(
                f"{field}: bad snapshot id {sid!r}: part {part!r} must match {_PART.pattern}", field=field)
    return sid


def check_function_id(function_id: str, field: str = "function_id") -> str:
    """Returns ``function_id`` if it is ``tenant/namespace/name``; else InvalidArgument naming ``field``."""
    parts = function_id.split("/")
    if len(parts) != 3 or not all(_PART.fullmatch(p) for p in parts):
        raise errors.InvalidArgument(
            f"{field}: bad function id {function_id!r}: expected tenant/namespace/name, each part "
            f"matching {_PART.pattern}", field=field)
    return function_id


def safe_name(sid: str) -> str:
    """A directory name for ``sid``; '.' never occurs in an id part, so the mapping is one-to-one."""
    function_id, rev = split_snapshot_id(check_snapshot_id(sid))
    return function_id.replace("/", ".") + f".{rev}"
