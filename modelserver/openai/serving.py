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

from modelserver import tools as toolcalls
from modelserver.engine import Piece
from modelserver.instance import Instance
from modelserver.metrics import ServerMetrics
from modelserver.openai import sse
from modelserver.openai.requests import Prepared
from modelserver.reasoning import ReasoningSplitter
from modelserver.reasoning import split as split_reasoning
from modelserver.sampling import Sampled
from snapwake.errors import SnapwakeError
from snapwake.openai import openai_error

__all__ = ["collect", "stream", "pieces"]

_END = object()


async def pieces(instance: Instance, req: Prepared, cancel: threading.Event,
                 metrics: ServerMetrics | None = None) -> AsyncIterator[Piece]:
    """The engine's pieces, produced in a worker thread; counts the request as in flight and
    observes its latencies and tokens in ``metrics``."""
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
    started = last = time.monotonic()
    tokens = [0] * req.params.n
    if metrics is not None:
        metrics.prompt_tokens.inc(len(req.prompt_ids))
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if metrics is not None:
                now, new = time.monotonic(), item.completion_tokens - tokens[item.index]
                tokens[item.index] = item.completion_tokens
                if new > 0:
                    if last == started:
                        metrics.ttft.observe(now - started)
                    else:
                        metrics.inter_token.observe((now - last) / new)
                    metrics.generation_tokens.inc(new)
                    last = now
                if item.finish_reason is not None:
                    metrics.requests.labels(item.finish_reason).inc()
            yield item
    finally:
        cancel.set()
        instance.inflight -= 1
        instance.last_request_unix = time.time()


def _logprob_entries(tokenizer: Any, picked: tuple[Sampled, ...]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Each token's text, logprob and alternatives (logprobs clamped: JSON has no -inf)."""
    def text(tok: int) -> str:
        return str(tokenizer.decode([tok]))

    return [(text(p.token), max(p.logprob or 0.0, -9999.0), [(text(t), max(v, -9999.0)) for t, v in p.top])
            for p in picked]


def _logprobs(tokenizer: Any, chat: bool, picked: tuple[Sampled, ...], offset: int) -> dict[str, Any]:
    entries = _logprob_entries(tokenizer, picked)
    return sse.chat_logprobs(entries) if chat else sse.completion_logprobs(entries, offset)


async def collect(instance: Instance, req: Prepared, chat: bool, cancel: threading.Event,
                  metrics: ServerMetrics | None = None) -> dict[str, Any]:
    """The whole completion (its ``n`` choices) as one response object."""
    n = req.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    tokens = [0] * n
    picked: list[list[Sampled]] = [[] for _ in range(n)]
    async for p in pieces(instance, req, cancel, metrics):
        texts[p.index].append(p.text)
        picked[p.index] += p.logprobs
        reasons[p.index], tokens[p.index] = p.finish_reason or reasons[p.index], p.completion_tokens
    rid, created = _id(chat), int(time.time())
    choices = []
    for i in range(n):
        out = "".join(texts[i])
        lp = None
        if req.params.logprobs is not None:
            lp = _logprobs(instance.tokenizer, chat, tuple(picked[i]), 0)
        choice: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": reasons[i]}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": out, "refusal": None, "tool_calls": []}
            if req.reasoning is not None:
                message["reasoning_content"], out = split_reasoning(out, req.reasoning)
                message["content"] = out
            if req.tools is not None:
                parsed = toolcalls.parse(out, req.tools)
                if parsed.calls:
                    message.update(content=parsed.content, tool_calls=parsed.calls)
                    choice["finish_reason"] = "tool_calls"
            choice["message"] = message
        else:
            choice["text"] = out
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "choices": choices, "usage": sse.usage(len(req.prompt_ids), sum(tokens))}


async def stream(instance: Instance, req: Prepared, chat: bool, cancel: threading.Event,
                 metrics: ServerMetrics | None = None) -> AsyncIterator[bytes]:
    """The completion as SSE events, ending with ``[DONE]``; errors mid-stream become an event.
    With ``n`` > 1 the choices' chunks interleave, each naming its ``index``."""
    rid, created = _id(chat), int(time.time())
    tokens = [0] * req.params.n
    offsets = [0] * req.params.n
    # A choice's role chunk goes out with its first piece, not before the prefill: the first byte
    # a client (or the gateway's CS-TTFT metric) sees is then the first token's.
    started: set[int] = set()
    want_lp = req.params.logprobs is not None
    # With tools, each choice's text goes through a tool-call reader: content and calls as deltas.
    readers = {i: toolcalls.ToolCallStream(req.tools) for i in range(req.params.n)} if req.tools is not None else {}
    splitters = {i: ReasoningSplitter(req.reasoning) for i in range(req.params.n)} if req.reasoning is not None else {}
    try:
        async for p in pieces(instance, req, cancel, metrics):
            i = p.index
            if chat and req.tools is not None:
                if i not in started:
                    started.add(i)
                    yield sse.event(sse.chat_chunk(rid, req.model, created, {"role": "assistant", "content": ""},
                                                   None, index=i))
                tokens[i] = p.completion_tokens
                for chunk in _tool_chunks(rid, req, created, i, p, readers[i], splitters.get(i)):
                    yield sse.event(chunk)
                continue
            if chat and i not in started:
                started.add(i)
                yield sse.event(sse.chat_chunk(rid, req.model, created, {"role": "assistant", "content": ""}, None,
                                               index=i))
            tokens[i] = p.completion_tokens
            lp = _logprobs(instance.tokenizer, chat, p.logprobs, offsets[i]) if want_lp else None
            offsets[i] += len(p.text)
            if chat:
                delta: dict[str, str] = {"content": p.text} if p.text else {}
                if i in splitters:
                    reasoning, answer = splitters[i].feed(p.text)
                    if p.finish_reason is not None:
                        more = splitters[i].flush()
                        reasoning, answer = reasoning + more[0], answer + more[1]
                    delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", answer)) if v}
                yield sse.event(sse.chat_chunk(rid, req.model, created, delta, p.finish_reason, index=i, logprobs=lp))
            else:
                yield sse.event(sse.completion_chunk(rid, req.model, created, p.text, p.finish_reason, index=i,
                                                     logprobs=lp))
    except SnapwakeError as exc:
        yield sse.event(openai_error(exc)[1])
        return
    if req.params.include_usage:
        use = sse.usage(len(req.prompt_ids), sum(tokens))
        chunk = (sse.chat_chunk(rid, req.model, created, None, None, use) if chat
                 else sse.completion_chunk(rid, req.model, created, None, None, use))
        yield sse.event(chunk)
    yield sse.DONE


def _tool_chunks(rid: str, req: Prepared, created: int, index: int, piece: Piece,
                 reader: toolcalls.ToolCallStream, splitter: ReasoningSplitter | None) -> list[dict[str, Any]]:
    """The chunks one piece of a request with tools allows: its reasoning, its content, its tool
    calls' deltas (``modelserver.tools.ToolCallStream``), and with the last piece the finish
    (``tool_calls`` when a call went out)."""
    text, deltas = piece.text, []
    if splitter is not None:
        reasoning, text = splitter.feed(piece.text)
        if piece.finish_reason is not None:
            more = splitter.flush()
            reasoning, text = reasoning + more[0], text + more[1]
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
    deltas += reader.feed(text)
    if piece.finish_reason is not None:
        deltas += reader.finish()
    chunks = [sse.chat_chunk(rid, req.model, created, d, None, index=index) for d in deltas]
    if piece.finish_reason is not None:
        chunks.append(sse.chat_chunk(rid, req.model, created, {}, "tool_calls" if reader.called
                                     else piece.finish_reason, index=index))
    return chunks


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
