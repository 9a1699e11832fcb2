"""The client side of every gRPC edge: the channel, and the one place its errors are translated.

Every client makes its calls through these helpers, which raise the ``snapwake.errors`` class
for a failed call's status (``errors.from_rpc_error``; a StartFailed comes back as StartFailed)
and let ``asyncio.CancelledError`` through untouched:

    response = await call(stub.Method, request, timeout=5.0)       # unary, or client-streaming
    async for message in stream(stub.Method, request, timeout=5.0):  # server-streaming
        ...
    for message in blocking_stream(stub.Method, request, timeout=5.0):  # on a blocking channel
        ...

``channel(address, tls, server_role=...)`` is plaintext without ``tls``; with it, TLS that presents
the service's own certificate (mutual TLS; ``snapwake.tlsconfig``) and checks the server's under
``<server_role>.snapwake.internal``, so a gateway dialling a scheduler accepts only a scheduler.

No code outside this module catches ``grpc.RpcError`` (tests/unit/test_architecture.py checks).
The helpers are plain functions, not a client interceptor, so a caller's cancel reaches the
server exactly as ``_awaited`` below arranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from snapwake import errors
from snapwake.pki import server_name
from snapwake.tlsconfig import ClientTls

__all__ = ["blocking_channel", "blocking_stream", "call", "channel", "stream"]

R = TypeVar("R")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        raise errors.from_rpc_error(err) from None


async def call(rpc: Callable[..., Awaitable[R]], request: Any, *, timeout: float) -> R:
    """Calls a unary-response RPC (``request`` may be an async iterator for client-streaming).

    Raises the domain error for a failed call.
    """
    with _translated():
        return await rpc(request, timeout=timeout)


async def stream(rpc: Callable[..., Any], request: Any, *, timeout: float) -> AsyncIterator[Any]:
    """Yields the responses of a server-streaming RPC; raises the domain error for a failed call.

    Leaving the loop early cancels the call.
    """
    responses = rpc(request, timeout=timeout)
    try:
        with _translated():
            async for message in responses:
                yield message
    finally:
        responses.cancel()


def blocking_stream(rpc: Callable[..., Iterable[R]], request: Any, *, timeout: float) -> Iterator[R]:
    """``stream`` for a blocking channel (code that runs on worker threads)."""
    responses = rpc(request, timeout=timeout)
    try:
        with _translated():
            yield from responses
    finally:
        responses.cancel()  # type: ignore[attr-defined]


async def _awaited(rpc_call: Any) -> Any:
    """Awaits ``rpc_call`` inside the interceptor chain, so a client cancel reaches the server.

    OTel's aio client interceptor awaits ``call.code()``, which does not cancel the RPC when the
    caller is cancelled: the server handler runs on and a granted claim is never released
    (open-telemetry/opentelemetry-python-contrib#3271). Awaiting the call itself does.
    """
    try:
        await rpc_call
    except grpc.RpcError:
        pass  # the returned call carries the status; awaiting it raises for the caller (in ``call``)
    return rpc_call


# Two classes: grpc.aio files an interceptor under the first RPC kind it subclasses only.
class _AwaitUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _awaited(await continuation(details, request))


class _AwaitStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await _awaited(await continuation(details, request_iterator))


def _client_interceptors() -> list[Any]:
    try:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError:
        return []
    # The _Await* interceptors must come after (inside) the OTel ones.
    return [*aio_client_interceptors(), _AwaitUnaryUnary(), _AwaitStreamUnary()]


_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _secure(tls: ClientTls, server_role: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Credentials presenting ``tls``'s pair (if any) and checking the server against its CA; with
    ``server_role``, under the name ``<role>.snapwake.internal`` instead of the address dialled."""
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca or None, private_key=tls.key or None,
                                         certificate_chain=tls.cert or None)
    return creds, ([("grpc.ssl_target_name_override", server_name(server_role))] if server_role else [])


def channel(address: str, tls: ClientTls | None = None, server_role: str = "",
            options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An aio channel to ``address`` with trace propagation: plaintext without ``tls``, else TLS
    presenting ``tls``'s certificate and checking the server's (of ``server_role``, when given)."""
    opts = [*_MESSAGE_OPTIONS, *options]
    if tls is None:
        return grpc.aio.insecure_channel(address, interceptors=_client_interceptors(), options=opts)
    creds, name = _secure(tls, server_role)
    return grpc.aio.secure_channel(address, creds, interceptors=_client_interceptors(), options=[*opts, *name])


def blocking_channel(address: str, tls: ClientTls | None = None, server_role: str = "",
                     options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """``channel`` for blocking code (worker threads, test drivers), without trace interceptors."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    creds, name = _secure(tls, server_role)
    return grpc.secure_channel(address, creds, options=[*options, *name])
