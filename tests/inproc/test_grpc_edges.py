"""Both ends of a gRPC edge against a real ``GrpcServer`` on port 0.

Server: ``ErrorInterceptor`` answers every error class with its code and details, anything else
with INTERNAL (logged), in all four RPC shapes, leaves cancellation and a handler's own abort
alone, and its statuses still reach the OpenTelemetry server span.

Client: ``snapwake.grpcclient`` turns every status back into its error class (StartFailed
included), for unary, client-streaming and server-streaming calls, blocking or not.

The handlers are generic (raw bytes, service ``snapwake.test.Edges``) so that one servicer has
every shape; the request names what the handler raises. A stream written with ``context.write``
(health's Watch) is tried on a server with ``ErrorInterceptor`` alone: OpenTelemetry's interceptor
cannot wrap one (open-telemetry/opentelemetry-python-contrib#3066), so GrpcServer leaves health
out of tracing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode as SpanStatus

from snapwake import errors
from snapwake.grpcclient import blocking_stream, call, channel, stream
from snapwake.grpcserver import ErrorInterceptor, GrpcServer

pytestmark = pytest.mark.timeout(30)

SERVICE = "snapwake.test.Edges"
T = 5.0
Code = grpc.StatusCode


class _Corrupt(errors.FailedPrecondition):
    """A service's own subclass keeps its parent's code."""


# What a handler raises -> the status the client must see.
SERVER_CASES: list[tuple[Exception, grpc.StatusCode, str]] = [
    (errors.InvalidArgument("spec.name: must be lowercase", field="spec.name"), Code.INVALID_ARGUMENT,
     "spec.name: must be lowercase"),
    (errors.NotFound("function a/b/c does not exist"), Code.NOT_FOUND, "function a/b/c does not exist"),
    (errors.AlreadyExists("function a/b/c already exists"), Code.ALREADY_EXISTS, "function a/b/c already exists"),
    (errors.FailedPrecondition("instance is stopping"), Code.FAILED_PRECONDITION, "instance is stopping"),
    (errors.Aborted("lost the compare-and-swap"), Code.ABORTED, "lost the compare-and-swap"),
    (errors.Unavailable("not the leader"), Code.UNAVAILABLE, "not the leader"),
    (errors.ResourceExhausted("queue full"), Code.RESOURCE_EXHAUSTED, "queue full"),
    (errors.DeadlineExceeded("no instance within 3s"), Code.DEADLINE_EXCEEDED, "no instance within 3s"),
    (errors.StartFailed("runc exited 1"), Code.UNAVAILABLE, "start failed: runc exited 1"),
    (_Corrupt("chunk 2 failed its sha256 check"), Code.FAILED_PRECONDITION, "chunk 2 failed its sha256 check"),
    (errors.SnapwakeError("a root error"), Code.INTERNAL, "a root error"),
    (ValueError("boom"), Code.INTERNAL, "internal error: ValueError: boom"),
    (KeyError("gone"), Code.INTERNAL, "internal error: KeyError: 'gone'"),
]
_RAISES = {type(exc).__name__: exc for exc, _, _ in SERVER_CASES}
_IDS = [type(exc).__name__ for exc, _, _ in SERVER_CASES]


class Edges:
    """One handler per RPC shape; each acts on what its (first) request names."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.closed = asyncio.Event()

    async def act(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        name = request.decode()
        if name == "sleep":
            self.started.set()
            try:
                await asyncio.sleep(T)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif name == "abort":
            await context.abort(Code.PERMISSION_DENIED, "the handler said no")
        elif name in _RAISES:
            raise _RAISES[name]

    async def unary_unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self.act(request, context)
        return b"ok"

    async def unary_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await self.act(request, context)
            yield b"last"
        finally:
            self.closed.set()

    async def unary_stream_write(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.write(b"first")
        await self.act(request, context)
        await context.write(b"last")

    async def stream_unary(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        got = [r async for r in requests]
        await self.act(got[0], context)
        return b"ok"

    async def stream_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r
            await self.act(r, context)


def _handlers(edges: Edges) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(edges.unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(edges.unary_stream),
        "UnaryStreamWrite": grpc.unary_stream_rpc_method_handler(edges.unary_stream_write),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(edges.stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(edges.stream_stream),
    })


@pytest.fixture
async def edge() -> AsyncIterator[tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int]]:
    """A GrpcServer (tracing to memory) serving ``Edges``, and a ``grpcclient.channel`` to it."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    edges = Edges()
    server = GrpcServer("127.0.0.1:0", [], tracer_provider=provider)
    server.server.add_generic_rpc_handlers((_handlers(edges),))
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}") as ch:
            yield edges, ch, spans, server.port
    finally:
        await server.stop(0)
        provider.shutdown()


@pytest.fixture
async def bare() -> AsyncIterator[grpc.aio.Channel]:
    """``Edges`` behind ``ErrorInterceptor`` alone, for the ``context.write`` stream."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((_handlers(Edges()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(0)


def _rpc(ch: grpc.aio.Channel, method: str) -> Any:
    kind = {"UnaryUnary": ch.unary_unary, "UnaryStream": ch.unary_stream, "UnaryStreamWrite": ch.unary_stream,
            "StreamUnary": ch.stream_unary, "StreamStream": ch.stream_stream}[method]
    return kind(f"/{SERVICE}/{method}")


async def _requests(*names: str) -> AsyncIterator[bytes]:
    for name in names:
        yield name.encode()


async def _raw(ch: grpc.aio.Channel, method: str, name: str) -> tuple[list[bytes], grpc.aio.AioRpcError]:
    """Calls ``method`` on a raw multicallable; the messages received before the error, and the error."""
    got: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method in ("UnaryUnary", "StreamUnary"):
            request = name.encode() if method == "UnaryUnary" else _requests(name)
            got.append(await _rpc(ch, method)(request, timeout=T))
        else:
            request = name.encode() if method != "StreamStream" else _requests(name)
            async for message in _rpc(ch, method)(request, timeout=T):
                got.append(message)
    return got, caught.value


# ---- server: ErrorInterceptor --------------------------------------------------------------------

@pytest.mark.parametrize(("exc", "code", "details"), SERVER_CASES, ids=_IDS)
async def test_each_error_class_is_answered_with_its_code_and_details(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int],
        exc: Exception, code: grpc.StatusCode, details: str) -> None:
    _, ch, _, _ = edge
    _, err = await _raw(ch, "UnaryUnary", type(exc).__name__)
    assert (err.code(), err.details()) == (code, details)


@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "UnaryStreamWrite", "StreamUnary", "StreamStream"])
async def test_every_rpc_shape_is_translated(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int],
                                             bare: grpc.aio.Channel, method: str) -> None:
    ch = bare if method == "UnaryStreamWrite" else edge[1]
    got, err = await _raw(ch, method, "NotFound")
    assert (err.code(), err.details()) == (Code.NOT_FOUND, "function a/b/c does not exist")
    # A streaming answer keeps what was sent before the error (StreamStream echoes its request).
    assert got == {"UnaryUnary": [], "StreamUnary": [], "UnaryStream": [b"first"], "UnaryStreamWrite": [b"first"],
                   "StreamStream": [b"NotFound"]}[method]
    got, err = await _raw(ch, method, "StartFailed")
    assert (err.code(), err.details()) == (Code.UNAVAILABLE, "start failed: runc exited 1")


@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"])
async def test_unexpected_exception_is_logged_and_internal(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int], method: str,
        caplog: pytest.LogCaptureFixture) -> None:
    _, ch, _, _ = edge
    with caplog.at_level(logging.ERROR, logger="snapwake.grpcserver"):
        _, err = await _raw(ch, method, "ValueError")
    assert (err.code(), err.details()) == (Code.INTERNAL, "internal error: ValueError: boom")
    [record] = [r for r in caplog.records if r.name == "snapwake.grpcserver"]
    assert record.getMessage() == f"unhandled error in /{SERVICE}/{method}"
    assert record.exc_info is not None and record.exc_info[0] is ValueError


async def test_domain_errors_and_own_aborts_are_not_logged(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int], caplog: pytest.LogCaptureFixture) -> None:
    _, ch, _, _ = edge
    with caplog.at_level(logging.DEBUG, logger="snapwake.grpcserver"):
        _, err = await _raw(ch, "UnaryUnary", "abort")
        assert (err.code(), err.details()) == (Code.PERMISSION_DENIED, "the handler said no")
        _, err = await _raw(ch, "UnaryStream", "abort")
        assert (err.code(), err.details()) == (Code.PERMISSION_DENIED, "the handler said no")
        _, err = await _raw(ch, "UnaryUnary", "NotFound")
        assert err.code() == Code.NOT_FOUND
    assert [r for r in caplog.records if r.name == "snapwake.grpcserver"] == []


@pytest.mark.parametrize("method", ["UnaryUnary", "StreamUnary"])
async def test_client_cancel_reaches_the_handler_and_is_no_error(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int], method: str,
        caplog: pytest.LogCaptureFixture) -> None:
    edges, ch, _, _ = edge
    request: Any = b"sleep" if method == "UnaryUnary" else _requests("sleep")
    with caplog.at_level(logging.DEBUG, logger="snapwake.grpcserver"):
        task = asyncio.ensure_future(call(_rpc(ch, method), request, timeout=T))
        await asyncio.wait_for(edges.started.wait(), T)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(edges.cancelled.wait(), 2)
    assert [r for r in caplog.records if r.name == "snapwake.grpcserver"] == []


async def test_leaving_a_stream_early_cancels_the_handler(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int], caplog: pytest.LogCaptureFixture) -> None:
    edges, ch, _, _ = edge
    with caplog.at_level(logging.DEBUG, logger="snapwake.grpcserver"):
        async for message in stream(_rpc(ch, "UnaryStream"), b"sleep", timeout=T):
            assert message == b"first"
            await asyncio.wait_for(edges.started.wait(), T)
            break
        await asyncio.wait_for(edges.cancelled.wait(), 2)
        await asyncio.wait_for(edges.closed.wait(), 2)  # the handler's generator was closed, too
    assert [r for r in caplog.records if r.name == "snapwake.grpcserver"] == []


async def test_statuses_reach_the_server_span(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int]
                                              ) -> None:
    _, ch, spans, _ = edge
    await _raw(ch, "UnaryUnary", "Unavailable")
    await _raw(ch, "UnaryStream", "ValueError")

    def server_spans() -> dict[str, Any]:
        return {s.name: s for s in spans.get_finished_spans() if s.kind.name == "SERVER"}

    for _ in range(100):  # the server span ends just after the client has its answer
        if len(server_spans()) == 2:
            break
        await asyncio.sleep(0.02)
    found = server_spans()
    for method, code, text in [("UnaryUnary", Code.UNAVAILABLE, "not the leader"),
                               ("UnaryStream", Code.INTERNAL, "internal error: ValueError: boom")]:
        span = found[f"/{SERVICE}/{method}"]
        assert span.attributes["rpc.grpc.status_code"] == code.value[0]
        assert span.status.status_code is SpanStatus.ERROR and text in (span.status.description or "")


# ---- client: snapwake.grpcclient -----------------------------------------------------------------

# A status a server sends -> what ``call`` raises.
CLIENT_CASES: list[tuple[grpc.StatusCode, str, type[errors.SnapwakeError], str]] = [
    (Code.INVALID_ARGUMENT, "bad", errors.InvalidArgument, "bad"),
    (Code.NOT_FOUND, "gone", errors.NotFound, "gone"),
    (Code.ALREADY_EXISTS, "twice", errors.AlreadyExists, "twice"),
    (Code.FAILED_PRECONDITION, "stopping", errors.FailedPrecondition, "stopping"),
    (Code.ABORTED, "retry", errors.Aborted, "retry"),
    (Code.UNAVAILABLE, "not the leader", errors.Unavailable, "not the leader"),
    (Code.UNAVAILABLE, "start failed: runc exited 1", errors.StartFailed, "runc exited 1"),
    (Code.RESOURCE_EXHAUSTED, "full", errors.ResourceExhausted, "full"),
    (Code.DEADLINE_EXCEEDED, "late", errors.DeadlineExceeded, "late"),
    (Code.PERMISSION_DENIED, "no", errors.PermissionDenied, "no"),
    (Code.UNAUTHENTICATED, "who", errors.Unauthenticated, "who"),
    (Code.INTERNAL, "internal error: ValueError: boom", errors.SnapwakeError, "internal error: ValueError: boom"),
    (Code.UNIMPLEMENTED, "", errors.SnapwakeError, "StatusCode.UNIMPLEMENTED"),
]


@pytest.fixture
async def aborter() -> AsyncIterator[grpc.aio.Channel]:
    """A server whose one method aborts with the code and details it is sent as ``code|details``."""

    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        code, _, details = request.decode().partition("|")
        await context.abort(Code[code], details)
        return b""

    server = GrpcServer("127.0.0.1:0", [])
    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Abort": grpc.unary_unary_rpc_method_handler(abort)}),))
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}") as ch:
            yield ch
    finally:
        await server.stop(0)


@pytest.mark.parametrize(("code", "details", "cls", "message"), CLIENT_CASES,
                         ids=[f"{c.name}-{d[:12]}" for c, d, _, _ in CLIENT_CASES])
async def test_each_status_becomes_its_error_class(aborter: grpc.aio.Channel, code: grpc.StatusCode, details: str,
                                                   cls: type[errors.SnapwakeError], message: str) -> None:
    with pytest.raises(errors.SnapwakeError) as caught:
        await call(aborter.unary_unary(f"/{SERVICE}/Abort"), f"{code.name}|{details}".encode(), timeout=T)
    assert type(caught.value) is cls and caught.value.message == message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no gRPC object leaks


@pytest.mark.parametrize(("exc", "code", "details"), SERVER_CASES, ids=_IDS)
async def test_domain_errors_round_trip(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int],
                                        exc: Exception, code: grpc.StatusCode, details: str) -> None:
    _, ch, _, _ = edge
    with pytest.raises(errors.SnapwakeError) as caught:
        await call(_rpc(ch, "UnaryUnary"), type(exc).__name__.encode(), timeout=T)
    if isinstance(exc, errors.SnapwakeError) and code != Code.INTERNAL:
        # The most specific class that the status carries (a service's subclass comes back as its parent).
        assert isinstance(exc, type(caught.value)) and type(caught.value) is not errors.SnapwakeError
        assert caught.value.message == exc.message
    else:
        assert type(caught.value) is errors.SnapwakeError and caught.value.message == details


async def test_client_streaming_call_is_translated(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int]
                                                   ) -> None:
    _, ch, _, _ = edge
    assert await call(_rpc(ch, "StreamUnary"), _requests("ok", "more"), timeout=T) == b"ok"
    with pytest.raises(errors.StartFailed, match="^runc exited 1$"):
        await call(_rpc(ch, "StreamUnary"), _requests("StartFailed"), timeout=T)


@pytest.mark.parametrize("method", ["UnaryStream", "UnaryStreamWrite"])
async def test_server_stream_yields_then_raises(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int],
                                                bare: grpc.aio.Channel, method: str) -> None:
    ch = bare if method == "UnaryStreamWrite" else edge[1]
    assert [m async for m in stream(_rpc(ch, method), b"ok", timeout=T)] == [b"first", b"last"]
    got: list[bytes] = []
    with pytest.raises(errors.FailedPrecondition, match="chunk 2"):
        async for message in stream(_rpc(ch, method), b"_Corrupt", timeout=T):
            got.append(message)
    assert got == [b"first"]


async def test_blocking_stream_yields_then_raises(edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int]
                                                  ) -> None:
    _, _, _, port = edge

    def fetch(name: bytes) -> list[bytes]:
        got: list[bytes] = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                for message in blocking_stream(ch.unary_stream(f"/{SERVICE}/UnaryStream"), name, timeout=T):
                    got.append(message)
            except errors.SnapwakeError as exc:
                got.append(f"{type(exc).__name__}: {exc.message}".encode())
        return got

    assert await asyncio.to_thread(fetch, b"ok") == [b"first", b"last"]
    assert await asyncio.to_thread(fetch, b"NotFound") == [b"first", b"NotFound: function a/b/c does not exist"]


async def test_deadline_and_unreachable_address_are_domain_errors(
        edge: tuple[Edges, grpc.aio.Channel, InMemorySpanExporter, int]) -> None:
    _, ch, _, _ = edge
    with pytest.raises(errors.DeadlineExceeded):
        await call(_rpc(ch, "UnaryUnary"), b"sleep", timeout=0.2)
    async with channel("127.0.0.1:1") as nowhere:
        with pytest.raises(errors.Unavailable):
            await call(_rpc(nowhere, "UnaryUnary"), b"ok", timeout=T)
