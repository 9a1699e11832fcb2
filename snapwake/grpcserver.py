"""An asyncio gRPC server with health, reflection, tracing, error translation and graceful shutdown.

Every service builds its server here so that ``grpcurl -plaintext host:port list`` works
against each of them, health answers SERVING while it runs and NOT_SERVING while it drains, and
``ErrorInterceptor`` is the one place where a servicer's exceptions become gRPC statuses.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snapwake import errors
from snapwake.grpcclient import channel

# ``channel`` lives in snapwake.grpcclient; it is re-exported for code that imports it from here.
__all__ = ["ErrorInterceptor", "GrpcServer", "channel"]

log = logging.getLogger(__name__)

# (request_streaming, response_streaming) -> the RpcMethodHandler attribute and its factory.
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    """Answers ``exc`` (by raising ``grpc.aio.AbortError``): a domain error with its code and
    details, anything else as INTERNAL."""
    if isinstance(exc, errors.SnapwakeError):
        await context.abort(exc.code, errors.grpc_details(exc))
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _translating_coroutine(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler answered itself (CancelledError is no Exception: it passes too)
        except Exception as exc:  # noqa: BLE001 - the boundary: translate, or log and answer INTERNAL
            await _abort(context, method, exc)

    return run


def _translating_generator(behavior: Callable[..., AsyncGenerator[Any, None]], method: str
                           ) -> Callable[..., AsyncIterator[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        responses = behavior(request, context)
        try:
            async for response in responses:
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary, as above
            await _abort(context, method, exc)
        finally:
            await responses.aclose()

    return run


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns what a servicer raises into a gRPC status, for every method of every service.

    A ``snapwake.errors.SnapwakeError`` is answered with its ``code`` and ``grpc_details`` (a
    StartFailed is tagged so clients can tell it from a plain UNAVAILABLE). Any other exception
    is logged with its stack and answered INTERNAL with only its type and message, so no bad
    request takes the service down. ``asyncio.CancelledError`` and ``grpc.aio.AbortError`` (a
    handler that aborted itself) pass through.

    It wraps the handler as written: an async generator stays one (a yielding stream), a
    coroutine stays one (a unary response, or a stream written with ``context.write`` such as
    health's Watch). A synchronous handler runs in gRPC's thread pool and is left as it is.
    """

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        attr, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):
            wrapped = _translating_generator(behavior, details.method)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = _translating_coroutine(behavior, details.method)
        else:
            return handler
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _interceptors(tracer_provider: Any = None) -> list[grpc.aio.ServerInterceptor]:
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    except ImportError:  # tracing is optional in stripped-down images
        return [ErrorInterceptor()]
    # Health is excluded: the aio interceptor breaks streaming handlers that use
    # context.write (health Watch), open-telemetry/opentelemetry-python-contrib#3066.
    # ErrorInterceptor comes after (inside) it, so its aborts reach the span's status.
    return [aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check())),
            ErrorInterceptor()]


class GrpcServer:
    """Owns one ``grpc.aio.Server`` plus its health and reflection services."""

    def __init__(self, bind: str, service_names: Iterable[str], message_bytes: int = 64 << 20, *,
                 tracer_provider: Any = None) -> None:
        """``tracer_provider``: where server spans go; None is the global one (tests pass theirs)."""
        self.server = grpc.aio.server(interceptors=_interceptors(tracer_provider), options=[
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
