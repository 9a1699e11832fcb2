"""An asyncio gRPC server with health, reflection, tracing and graceful shutdown.

Every service builds its server here so that ``grpcurl -plaintext host:port list`` works
against each of them, health answers SERVING while it runs and NOT_SERVING while it drains.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snapwake import errors

__all__ = ["GrpcServer", "channel", "translate_errors"]

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _interceptors() -> list[Any]:
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    except ImportError:  # tracing is optional in stripped-down images
        return []
    # Health is excluded: the aio interceptor breaks streaming handlers that use
    # context.write (health Watch), open-telemetry/opentelemetry-python-contrib#3066.
    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


async def _awaited(call: Any) -> Any:
    """Awaits ``call`` inside the interceptor chain, so a client cancel reaches the server.

    OTel's aio client interceptor awaits ``call.code()``, which does not cancel the RPC when the
    caller is cancelled: the server handler runs on and a granted claim is never released
    (open-telemetry/opentelemetry-python-contrib#3271). Awaiting the call itself does.
    """
    try:
        await call
    except grpc.RpcError:
        pass  # the returned call carries the status; awaiting it raises for the caller
    return call


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


def channel(address: str) -> grpc.aio.Channel:
    """An insecure aio channel to ``address`` with trace propagation."""
    return grpc.aio.insecure_channel(address, interceptors=_client_interceptors(),
                                     options=[("grpc.max_receive_message_length", 64 << 20),
                                              ("grpc.max_send_message_length", 64 << 20)])


def translate_errors(method: F) -> F:
    """Decorates a servicer method: domain errors become gRPC statuses, nothing else leaks.

    Unexpected exceptions are logged with their stack and answered as INTERNAL, so no bad
    request can take the service down.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except errors.SnapwakeError as exc:
            await context.abort(exc.code, errors.grpc_details(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: log, answer INTERNAL
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


class GrpcServer:
    """Owns one ``grpc.aio.Server`` plus its health and reflection services."""

    def __init__(self, bind: str, service_names: Iterable[str], message_bytes: int = 64 << 20) -> None:
        self.server = grpc.aio.server(interceptors=_interceptors(), options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {bind}")

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self._set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _set(self, name: str, status: int) -> None:
        result = self.health.set(name, status)
        if asyncio.iscoroutine(result):
            await result

    async def stop(self, grace: float = 5.0) -> None:
        """Reports NOT_SERVING, then lets in-flight calls finish for ``grace`` seconds."""
        result = self.health.enter_graceful_shutdown()
        if asyncio.iscoroutine(result):
            await result
        await self.server.stop(grace)
