"""An asyncio gRPC server with TLS, authorization, health, reflection, tracing, error translation
and graceful shutdown.

Every service builds its server here so that ``grpcurl ... host:port list`` works against each
of them, health answers SERVING while it runs and NOT_SERVING while it drains,
``AuthzInterceptor`` is the one place where a caller is authorized (``snapwake.authz``) and
``ErrorInterceptor`` the one place where a servicer's exceptions become gRPC statuses.

Ports. With TLS (``tls``), one server listens on up to three ports, all serving the same
services, and the authorization tells them apart by what the caller could prove:

- ``bind``: mutual TLS. gRPC refuses the handshake of a client without a certificate from the CA.
- ``admin_bind`` (the scheduler): server-authenticated TLS, no client certificate asked for;
  such a caller reaches only ``anonymous_services`` (SchedulerService, whose bearer token is
  checked by the servicer), health and reflection.
- ``health_bind``: plaintext, ``grpc.health.v1`` only, for probes (kubelet's gRPC probe speaks
  no TLS); everything else, reflection included, is refused UNAUTHENTICATED.

Why a separate admin port rather than optional client certificates on one port: gRPC Python's
``ssl_server_credentials(require_client_auth=False)`` does not ask the client for a certificate
at all (it maps to GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE), so a service could not see the
certificate of a caller that has one; ``tests/inproc/test_tls_wiring.py`` checks this.

Without ``tls`` (``dev_plaintext``, and the in-process tests that build bare servers) every port
is plaintext and nothing is authorized.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snapwake import authz, errors
from snapwake.grpcclient import channel
from snapwake.pki import Identity, identity_from_pem
from snapwake.tlsconfig import ServerTls

# ``channel`` lives in snapwake.grpcclient; it is re-exported for code that imports it from here.
__all__ = ["AuthzInterceptor", "ErrorInterceptor", "GrpcServer", "caller_identity", "channel", "peer_identity"]

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


# The identity of the current call's client (set by AuthzInterceptor; None without a certificate).
caller_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller_identity", default=None)


def _transport(context: Any) -> authz.Transport:
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return authz.Transport.PLAINTEXT
    return authz.Transport.MUTUAL_TLS if auth.get("x509_pem_cert") else authz.Transport.SERVER_TLS


# Parsing a certificate costs tens of microseconds; a server sees few distinct ones.
_identity_of = functools.lru_cache(maxsize=1024)(identity_from_pem)


def peer_identity(context: Any) -> Identity | None:
    """The identity in the client certificate of this call (verified against the CA by the TLS
    handshake), or None: no certificate (admin port, plaintext) or one without an identity."""
    pem = context.auth_context().get("x509_pem_cert")
    return _identity_of(pem[0]) if pem else None


class AuthzInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call ``snapwake.authz.decide`` refuses, before the servicer runs, and sets
    ``caller_identity`` for the ones it lets through."""

    def __init__(self, server: Identity | None, anonymous_services: Iterable[str] = ()) -> None:
        self.server = server
        self.anonymous_services = frozenset(anonymous_services)

    def _check(self, method: str, context: Any) -> tuple[authz.Refusal | None, Identity | None]:
        caller = peer_identity(context)
        refusal = authz.decide(method, _transport(context), caller, self.server, self.anonymous_services)
        if refusal is not None:
            log.warning("refused %s from %s (%s): %s", method, caller or "no identity", context.peer(),
                        refusal.message)
        caller_identity.set(caller)
        return refusal, caller

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        attr, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)
        method = details.method
        check = self._check
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):
            async def wrapped(request: Any, context: Any) -> Any:
                refusal, _ = check(method, context)
                if refusal is not None:
                    await context.abort(getattr(grpc.StatusCode, refusal.code.value), refusal.message)
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()
        elif inspect.iscoroutinefunction(behavior):
            async def wrapped(request: Any, context: Any) -> Any:  # type: ignore[misc]
                refusal, _ = check(method, context)
                if refusal is not None:
                    await context.abort(getattr(grpc.StatusCode, refusal.code.value), refusal.message)
                return await behavior(request, context)
        else:  # a synchronous handler: none of ours is one; refused rather than run unchecked
            async def wrapped(request: Any, context: Any) -> Any:  # type: ignore[misc]
                await context.abort(grpc.StatusCode.INTERNAL, f"{method}: a synchronous handler is not authorized")
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _interceptors(tracer_provider: Any = None, authorizer: AuthzInterceptor | None = None
                  ) -> list[grpc.aio.ServerInterceptor]:
    own: list[grpc.aio.ServerInterceptor] = [*([authorizer] if authorizer else []), ErrorInterceptor()]
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    except ImportError:  # tracing is optional in stripped-down images
        return own
    # Health is excluded: the aio interceptor breaks streaming handlers that use
    # context.write (health Watch), open-telemetry/opentelemetry-python-contrib#3066.
    # The others come after (inside) it, so their aborts reach the span's status.
    return [aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check())),
            *own]


class GrpcServer:
    """Owns one ``grpc.aio.Server`` plus its health and reflection services."""

    def __init__(self, bind: str, service_names: Iterable[str], message_bytes: int = 64 << 20, *,
                 tracer_provider: Any = None, tls: ServerTls | None = None, admin_bind: str = "",
                 health_bind: str = "", anonymous_services: Iterable[str] = ()) -> None:
        """``tracer_provider``: where server spans go; None is the global one (tests pass theirs).
        ``tls``: None serves plaintext without authorization (module docstring for the ports);
        ``anonymous_services``: what callers without a certificate reach on ``admin_bind``."""
        self.tls = tls
        authorizer = AuthzInterceptor(tls.identity, anonymous_services) if tls else None
        self.server = grpc.aio.server(interceptors=_interceptors(tracer_provider, authorizer), options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self._bind(bind, self._credentials(require_client_auth=True))
        self.admin_port = self._bind(admin_bind, self._credentials(require_client_auth=False)) if admin_bind else 0
        self.health_port = self._bind(health_bind, None) if health_bind else 0

    def _credentials(self, require_client_auth: bool) -> grpc.ServerCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials([(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca,
                                           require_client_auth=require_client_auth)

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        port = (self.server.add_secure_port(address, credentials) if credentials
                else self.server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        return port

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
