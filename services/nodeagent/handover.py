"""Each instance's own blobstore handover socket, ``{instance dir}/handover.sock``.

The blobstore opens it (``OpenInstanceHandover``) for the instance's function and GPU only:
before the container starts, and again before each restore (a restarted blobstore lost it;
reopening one that is open is a no-op). It is closed when the container goes. The container
sees it through its instance dir, never the node's socket.

An unreachable blobstore does not fail a start here: without its socket the instance can load
and store nothing (it fails closed), and the model server says so if it needs the socket. Any
other refusal (a bad directory, a bad id) fails the start or restore.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from snapwake import errors
from snapwake.grpcclient import call
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc

if TYPE_CHECKING:
    import grpc

    from services.nodeagent.agent import Live

__all__ = ["SOCKET_NAME", "close_socket", "open_socket", "socket_path"]

log = logging.getLogger(__name__)
SOCKET_NAME = "handover.sock"  # the blobstore's services/blobstore/handover/sockets.py names it so too


def socket_path(instance_dir: Path) -> Path:
    """Where an instance's model server finds its handover socket."""
    return instance_dir / SOCKET_NAME


async def open_socket(channel: grpc.aio.Channel, live: Live, limit_s: float = 5.0) -> None:
    """Has the blobstore open ``live``'s socket (see module docstring for what a failure does)."""
    inst = live.machine.instance
    req = blobstore_pb2.OpenInstanceHandoverRequest(
        instance_id=live.id, function_id=inst.function_id, gpu_index=inst.gpu_index if live.gpu else -1,
        instance_dir=str(live.dir))
    try:
        await call(blobstore_pb2_grpc.BlobstoreServiceStub(channel).OpenInstanceHandover, req, timeout=limit_s)
    except (errors.Unavailable, errors.DeadlineExceeded) as exc:
        log.warning("no handover socket for the instance (blobstore: %s); it can load and store nothing",
                    exc.message, extra={"instance_id": live.id})


async def close_socket(channel: grpc.aio.Channel, instance_id: str, limit_s: float = 2.0) -> None:
    """Has the blobstore close the instance's socket; a failure is logged (the blobstore also
    closes sockets whose instance dir is gone)."""
    req = blobstore_pb2.CloseInstanceHandoverRequest(instance_id=instance_id)
    try:
        await call(blobstore_pb2_grpc.BlobstoreServiceStub(channel).CloseInstanceHandover, req, timeout=limit_s)
    except errors.SnapwakeError as exc:
        log.info("could not close the handover socket: %s", exc.message, extra={"instance_id": instance_id})
