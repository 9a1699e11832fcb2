"""Runs one validated request on the instance and shapes the answer as JSON or SSE.

Generation runs in its own thread (the event loop stays free for health checks and other
clients); pieces come back through an asyncio queue. Leaving the stream early, or the client
disconnecting, sets ``cancel`` and the engine stops at the next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from modelserver.engine import Piece
from modelserver.instance import Instance
from modelserver.openai import sse
from modelserver.openai.requests import Prepared
from snapwake.errors import SnapwakeError
from snapwake.openai import openai_error

__all__ = ["collect", "stream", "pieces"]

_END = object()


async def pieces(instance: Instance, req: Prepared, cancel: threading.Event) -> AsyncIterator[Piece]:
    """The engine's pieces, produced in a worker thread; counts the request as in flight."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            cancel.set()

    parent = otel_context.get_current()  # the HTTP server span; the worker thread starts empty

    def work() -> None:
        try:
            with trace.get_tracer("snapwake").start_as_current_span(
                    "generate", context=parent, attributes={"snapwake.prompt_tokens": len(req.prompt_ids)}):
                instance.run(req.prompt_ids, req.params, cancel, put)
        except BaseException as exc:  # handed to the request's task, raised there
            put(exc)
        finally:
            put(_END)

    instance.inflight += 1
    instance.inflight_peak = max(instance.inflight_peak, instance.inflight)
    instance.last_request_unix = time.time()
    threading.Thread(target=work, name="generate", daemon=True).start()
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        instance.inflight -= 1
        instance.last_request_unix = time.time()


async def collect(instance: Instance, req: Prepared, chat: bool, cancel: threading.Event) -> dict[str, Any]:
    """The whole completion as one response object."""
    text, reason, n = [], "length", 0
    async for p in pieces(instance, req, cancel):
        text.append(p.text)
        reason, n = p.finish_reason or reason, p.completion_tokens
    out = "".join(text)
    rid, created = _id(chat), int(time.time())
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": out}
    else:
        choice["text"] = out
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice], "usage": sse.usage(len(req.prompt_ids), n)}


async def stream(instance: Instance, req: Prepared, chat: bool, cancel: threading.Event) -> AsyncIterator[bytes]:
    """The completion as SSE events, ending with ``[DONE]``; errors mid-stream become an event."""
    rid, created, n = _id(chat), int(time.time()), 0
    # The role chunk goes out with the first piece, not before the prefill: the first byte a
    # client (or the gateway's CS-TTFT metric) sees is then the first token's.
    role = chat
    try:
        async for p in pieces(instance, req, cancel):
            if role:
                role = False
                yield sse.event(sse.chat_chunk(rid, req.model, created, {"role": "assistant", "content": ""}, None))
            n = p.completion_tokens
            if chat:
                delta = {"content": p.text} if p.text else {}
                yield sse.event(sse.chat_chunk(rid, req.model, created, delta, p.finish_reason))
            else:
                yield sse.event(sse.completion_chunk(rid, req.model, created, p.text, p.finish_reason))
    except SnapwakeError as exc:
        yield sse.event(openai_error(exc)[1])
        return
    if req.params.include_usage:
        use = sse.usage(len(req.prompt_ids), n)
        chunk = (sse.chat_chunk(rid, req.model, created, None, None, use) if chat
                 else sse.completion_chunk(rid, req.model, created, None, None, use))
        yield sse.event(chunk)
    yield sse.DONE


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
