"""The handover sockets: model servers ask for an arena (``load``) or give one (``store``).

The protocol is in ``snapwake.protocols``. Two kinds of socket serve it:

- the node socket (``--handover-socket``, mode 0660): the nodeagent's ``prepare`` and host
  tools; it serves every snapshot and is never bound into a container;
- one socket per instance, ``{instance dir}/handover.sock``, which the nodeagent opens over gRPC
  (``OpenInstanceHandover``: instance id, function id, GPU, instance dir) before the container
  starts and closes (``CloseInstanceHandover``) when it ends. It serves ``load`` and ``store``
  of that function's snapshots on that GPU only (``grants``); anything else is refused with an
  error naming the snapshot and logged, and nothing is handed out.

Why a socket per instance rather than one shared socket checked with SO_PEERCRED: the
authority is which listening socket a client reached, and only its own directory is bound into
its container. Nothing maps a pid to an instance, so there is no race with pid reuse (a peer's
pid is only valid at connect time, and a user namespace maps every container's root to the same
uids), no dependence on cgroup layout, and a container restarted over the same instance
directory finds the same socket. A restarted blobstore loses its sockets: the nodeagent opens
the instance's socket again (idempotently) before every restore, and sockets whose file has
gone (instance dir removed) are closed on the next open.

Every connection is bounded (``HandoverLimits``): connections at once in all and per instance
socket, bytes per line, the wait for a request and for ``mapped``, the time to send a reply.
Each request runs in its connection's thread, so a slow DMA for one container never blocks
another; the work itself runs in ``Blobstore``.

    grants.py   who may ask what (pure)
    sockets.py  binding the node socket and instance sockets safely
    session.py  one connection: read, check, answer (the one place errors become replies)
    server.py   listeners, accept threads and connection slots
"""

from services.blobstore.handover.grants import Grant, PermissionDenied, grant
from services.blobstore.handover.server import HandoverServer
from services.blobstore.handover.session import HandoverLimits
from services.blobstore.handover.sockets import SOCKET_NAME

__all__ = ["SOCKET_NAME", "Grant", "HandoverLimits", "HandoverServer", "PermissionDenied", "grant"]
