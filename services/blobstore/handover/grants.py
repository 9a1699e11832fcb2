"""Who may ask what on a handover socket (pure).

The node socket serves every request. An instance socket serves ``load`` and ``store`` of its
instance's function's snapshots (any revision), on the instance's GPU (or host memory) only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.blobstore.ids import check_function_id
from snapwake import errors
from snapwake.keys import split_snapshot_id

__all__ = ["INSTANCE_OPS", "Grant", "PermissionDenied", "authorize", "grant"]

INSTANCE_OPS = ("load", "store")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{12}")


class PermissionDenied(errors.InvalidArgument):
    """A request outside an instance socket's grant. The shared error tree has no
    PERMISSION_DENIED class (clients map that code to the root), so over gRPC this would answer
    INVALID_ARGUMENT; on the handover socket only its message travels."""


@dataclass(frozen=True)
class Grant:
    """What one instance's handover socket serves."""

    instance_id: str
    """The instance (``i-`` and 12 hex digits); named in every log line about its socket."""
    function_id: str
    """``tenant/namespace/name``: the function whose snapshots it may load and store."""
    gpu: int
    """The one GPU index its requests may name; -1: host memory (memfd) only."""


def grant(instance_id: str, function_id: str, gpu: int) -> Grant:
    """A validated grant; InvalidArgument naming the bad field otherwise."""
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise errors.InvalidArgument(f"instance_id: expected i- and 12 hex digits, got {instance_id!r}",
                                     field="instance_id")
    check_function_id(function_id)
    if gpu < -1:
        raise errors.InvalidArgument(f"gpu_index: expected -1 (host memory) or a GPU index, got {gpu}",
                                     field="gpu_index")
    return Grant(instance_id, function_id, gpu)


def _gpu(gpu: int) -> str:
    return "host memory (gpu -1)" if gpu < 0 else f"gpu {gpu}"


def authorize(who: Grant | None, op: str, sid: str, gpu: int) -> None:
    """Raises PermissionDenied unless ``who`` (None: the node socket) may ``op`` the snapshot
    ``sid`` (already checked by ``check_snapshot_id``) on ``gpu``."""
    if who is None:
        return
    if op not in INSTANCE_OPS:
        raise PermissionDenied(f"permission denied: {op} is not served on instance {who.instance_id}'s "
                               f"socket (only {', '.join(INSTANCE_OPS)})", field="op")
    function_id, _revision = split_snapshot_id(sid)
    if function_id != who.function_id:
        raise PermissionDenied(f"permission denied: snapshot {sid} is not of function {who.function_id}, "
                               f"the only one instance {who.instance_id} may {op}", field="snapshot_id")
    if gpu != who.gpu:
        raise PermissionDenied(f"permission denied: instance {who.instance_id} may use {_gpu(who.gpu)} only, "
                               f"not {_gpu(gpu)}", field="gpu")
