"""A client-side cancel on a ``snapwake.grpcserver.channel()`` reaches the server handler.

The gateway cancels its AcquireClaim when a queue times out or a client disconnects; if the
scheduler never learns of it, the claim it grants is never released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from snapwake.grpcserver import GrpcServer, channel
from snapwake.v1 import blobstore_pb2, blobstore_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

HANDLER_SLEEP_S = 5.0


class _Probe:
    """What a slow server handler saw: that it started, and whether it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def sleep(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(HANDLER_SLEEP_S)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class _Claims(scheduler_pb2_grpc.ClaimServiceServicer):
    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    async def AcquireClaim(self, request: scheduler_pb2.AcquireClaimRequest,
                           context: grpc.aio.ServicerContext) -> scheduler_pb2.AcquireClaimResponse:
        await self.probe.sleep()
        return scheduler_pb2.AcquireClaimResponse()


class _Blobs(blobstore_pb2_grpc.BlobstoreServiceServicer):
    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    async def PutSnapshot(self, request_iterator: AsyncIterator[blobstore_pb2.PutSnapshotRequest],
                          context: grpc.aio.ServicerContext) -> blobstore_pb2.PutSnapshotResponse:
        async for _ in request_iterator:
            pass
        await self.probe.sleep()
        return blobstore_pb2.PutSnapshotResponse()


async def _chunks() -> AsyncIterator[blobstore_pb2.PutSnapshotRequest]:
    yield blobstore_pb2.PutSnapshotRequest(data=b"x")


def _acquire(ch: grpc.aio.Channel) -> Awaitable[object]:
    return scheduler_pb2_grpc.ClaimServiceStub(ch).AcquireClaim(scheduler_pb2.AcquireClaimRequest(function_id="f"))


def _put(ch: grpc.aio.Channel) -> Awaitable[object]:
    return blobstore_pb2_grpc.BlobstoreServiceStub(ch).PutSnapshot(_chunks())


@pytest.mark.parametrize("call", [_acquire, _put], ids=["unary_unary", "stream_unary"])
async def test_client_cancel_reaches_the_server_handler(call: Callable[[grpc.aio.Channel], Awaitable[object]]) -> None:
    probe = _Probe()
    server = GrpcServer("127.0.0.1:0", ["snapwake.v1.ClaimService", "snapwake.v1.BlobstoreService"])
    scheduler_pb2_grpc.add_ClaimServiceServicer_to_server(_Claims(probe), server.server)
    blobstore_pb2_grpc.add_BlobstoreServiceServicer_to_server(_Blobs(probe), server.server)
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}") as ch:
            task = asyncio.ensure_future(call(ch))
            await asyncio.wait_for(probe.started.wait(), 5)
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            try:
                await asyncio.wait_for(probe.cancelled.wait(), 2)
            except TimeoutError:
                pytest.fail("the server handler was not cancelled within 2 s of the client cancelling")
    finally:
        await server.stop(0)
