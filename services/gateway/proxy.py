"""Relaying one request to a claimed instance's OpenAI server.

``Upstream.open`` sends the request and returns once the instance's response headers arrived;
connection failures before that are ``InstanceUnreachable`` (the caller marks the instance
failed and may retry on another claim, since nothing reached the client yet). ``RelayResponse``
streams the SSE bytes on as they come; an upstream failure after the stream started is sent as
``data: {"error": ...}`` before the stream ends, and a client that disconnects cancels the
upstream read; a user image's stream passes through its ``SseRewriter`` (the ``model`` of each
event) on the way. httpx exceptions are translated here and nowhere else.

Instances live on other hosts, so a node can vanish without closing anything: its link goes
down and its packets stop. The read timeout cannot tell that from a long generation, so every
instance connection also carries TCP keepalive and ``TCP_USER_TIMEOUT`` (``dead_node_options``):
the peer's kernel acknowledges while its model server thinks, and once it has answered nothing
for ``dead_node_timeout`` the connection fails. Before the answer's headers that is
``InstanceUnreachable`` (the request moves to another instance); after, a stream ends with its
error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Mapping

import httpx
from starlette.types import Message, Receive, Scope, Send

from services.gateway.rewrite import SseRewriter
from services.gateway.scheduler_client import Claim
from snapwake import errors
from snapwake.openai import error_body

try:
    from opentelemetry.propagate import inject as otel_inject
except ImportError:  # tracing is optional
    otel_inject = None  # type: ignore[assignment]

__all__ = ["InstanceUnreachable", "RelayResponse", "Upstream", "dead_node_options", "wait_disconnect"]

log = logging.getLogger(__name__)


class InstanceUnreachable(errors.Unavailable):
    """The instance did not answer at all; nothing was relayed yet."""


class InstanceNotServing(errors.Unavailable):
    """The instance answered 503 (released, or being parked as a standby): it generated
    nothing, so the request can go to another claim. The instance itself is fine."""


def dead_node_options(dead_after_s: float) -> list[tuple[int, int, int]]:
    """Socket options that fail a connection whose peer host answered nothing (no keepalive
    probe, no data acknowledged) for about ``dead_after_s`` seconds (Linux)."""
    idle, interval = max(1, int(dead_after_s / 2)), max(1, int(dead_after_s / 4))
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
            # Bounds both the probes above and data sent and never acknowledged.
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1000, int(dead_after_s * 1000)))]


class Upstream:
    """One pooled HTTP client for every instance, with a short connect and a long read timeout;
    a connection whose node stops answering fails after ``dead_node_timeout`` (module docstring)."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None, dead_node_timeout: float = 20.0) -> None:
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout,
                                pool=connect_timeout)
        if transport is None:
            transport = httpx.AsyncHTTPTransport(socket_options=dead_node_options(dead_node_timeout),
                                                 limits=httpx.Limits(max_connections=None,
                                                                     max_keepalive_connections=256))
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def open(self, claim: Claim, path: str, body: bytes, request_id: str) -> httpx.Response:
        """POSTs ``body`` to the instance; returns with the headers read and the body not yet."""
        # Identity: the answer's bytes are relayed (and rewritten) without its content-encoding.
        headers = {"content-type": "application/json", "x-request-id": request_id,
                   "accept": "application/json, text/event-stream", "accept-encoding": "identity"}
        if otel_inject is not None:
            otel_inject(headers)
        request = self._client.build_request("POST", f"http://{claim.endpoint}{path}", content=body,
                                             headers=headers)
        try:
            return await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise InstanceUnreachable(f"instance {claim.instance_id} did not accept a connection") from None
            raise errors.DeadlineExceeded(f"instance {claim.instance_id} did not answer in time") from None
        except httpx.TransportError as exc:
            raise InstanceUnreachable(
                f"instance {claim.instance_id} at {claim.endpoint} failed: {type(exc).__name__}") from None

    async def read(self, response: httpx.Response, claim: Claim) -> bytes:
        """The whole body of a non-streaming answer."""
        try:
            return await response.aread()
        except httpx.TimeoutException:
            raise errors.DeadlineExceeded(f"instance {claim.instance_id} did not finish in time") from None
        except httpx.TransportError as exc:
            raise InstanceUnreachable(
                f"instance {claim.instance_id} broke off its answer: {type(exc).__name__}") from None
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self._client.aclose()


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call it only after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse_error(exc: BaseException) -> bytes:
    # A connection its node's kernel timed out (dead_node_options) says nothing more itself.
    body = error_body(f"the instance failed mid-stream: {type(exc).__name__}: {exc or 'the connection was lost'}",
                      "server_error", None, "upstream_error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class RelayResponse:
    """An ASGI response that relays an upstream SSE stream byte for byte, or line by line
    through ``rewrite`` when one is given.

    ``on_first_byte`` runs once when the first bytes go out (CS-TTFT); ``on_close(failed)``
    runs exactly once at the end, however it ends (the caller releases the claim there).
    """

    def __init__(self, upstream: httpx.Response, on_first_byte: Callable[[], None],
                 on_close: Callable[[bool], None], headers: Mapping[str, str] | None = None,
                 rewrite: SseRewriter | None = None) -> None:
        self._upstream = upstream
        self._on_first_byte, self._on_close = on_first_byte, on_close
        self._headers = dict(headers or {})
        self._rewrite = rewrite
        self._failed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not pump.done():
                log.info("client disconnected; cancelling the upstream request")
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
            await self._upstream.aclose()
            self._on_close(self._failed)

    async def _pump(self, send: Send) -> None:
        content_type = self._upstream.headers.get("content-type", "text/event-stream")
        headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache"),
                   *((k.lower().encode(), v.encode()) for k, v in self._headers.items())]
        await send({"type": "http.response.start", "status": self._upstream.status_code, "headers": headers})
        tail, first = b"\n\n", True
        try:
            async for chunk in self._upstream.aiter_raw():
                if self._rewrite is not None:
                    chunk = self._rewrite.feed(chunk)
                if not chunk:
                    continue
                if first:
                    first = False
                    self._on_first_byte()
                await send(_body(chunk, more=True))
                tail = (tail + chunk)[-2:]
        except httpx.HTTPError as exc:
            # A read timeout is a slow instance, not a dead one.
            self._failed = not isinstance(exc, httpx.TimeoutException)
            log.warning("upstream stream failed: %s: %s", type(exc).__name__, exc)
            separator = b"" if tail == b"\n\n" else b"\n\n"
            await send(_body(separator + _sse_error(exc), more=True))
        else:
            rest = self._rewrite.flush() if self._rewrite is not None else b""
            if rest:
                if first:
                    self._on_first_byte()
                await send(_body(rest, more=True))
        await send(_body(b"", more=False))


def _body(chunk: bytes, more: bool) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": more}
