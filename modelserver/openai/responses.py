"""``POST /v1/responses``: the Responses API for text in and text out, on the chat path.

The request becomes a chat request (``instructions`` as the system message, ``input`` as the
conversation, ``max_output_tokens`` as ``max_completion_tokens``), so it is checked, templated
and generated exactly as one; the answer is shaped as a ``response`` object, or streamed as the
Responses API's typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from modelserver.instance import Instance
from modelserver.metrics import ServerMetrics
from modelserver.openai.requests import Prepared, prepare_chat
from modelserver.openai.serving import pieces
from snapwake.errors import SnapwakeError
from snapwake.openai import openai_error, validate
from snapwake.openai.schema import ResponsesRequest

__all__ = ["collect", "prepare", "stream"]


def prepare(body: dict[str, Any], tokenizer: Any, max_context: int) -> tuple[Prepared, ResponsesRequest]:
    request = validate(body, ResponsesRequest)
    chat: dict[str, Any] = {"model": request.model, "messages": request.messages(), "stream": request.stream}
    for ours, theirs in (("max_completion_tokens", "max_output_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p")):
        if getattr(request, theirs) is not None:
            chat[ours] = getattr(request, theirs)
    try:
        return prepare_chat(chat, tokenizer, max_context), request
    except SnapwakeError as exc:  # name the Responses field, not the chat one
        if exc.field == "max_completion_tokens":
            exc.field = "max_output_tokens"
            exc.message = exc.message.replace("max_completion_tokens", "max_output_tokens")
        elif exc.field == "messages":
            exc.field = "input"
        raise


def _response(rid: str, mid: str, req: Prepared, request: ResponsesRequest, created: int, status: str,
              text: str | None, reason: str | None, out_tokens: int) -> dict[str, Any]:
    output = []
    if text is not None:
        output = [{"type": "message", "id": mid, "status": "completed" if status == "completed" else "incomplete",
                   "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": [],
                                                     "logprobs": []}]}]
    incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": req.model,
            "output": output, "error": None, "incomplete_details": incomplete,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}}, "metadata": request.metadata or {},
            "usage": None if text is None else {
                "input_tokens": len(req.prompt_ids), "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(req.prompt_ids) + out_tokens}}


def _ids() -> tuple[str, str]:
    return "resp_" + uuid.uuid4().hex[:24], "msg_" + uuid.uuid4().hex[:24]


async def collect(instance: Instance, req: Prepared, request: ResponsesRequest,
                  cancel: threading.Event, metrics: ServerMetrics | None = None) -> dict[str, Any]:
    texts, reason, n = [], "length", 0
    async for p in pieces(instance, req, cancel, metrics):
        texts.append(p.text)
        reason, n = p.finish_reason or reason, p.completion_tokens
    rid, mid = _ids()
    status = "incomplete" if reason == "length" else "completed"
    return _response(rid, mid, req, request, int(time.time()), status, "".join(texts), reason, n)


def _event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: ".encode() + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def stream(instance: Instance, req: Prepared, request: ResponsesRequest,
                 cancel: threading.Event, metrics: ServerMetrics | None = None) -> AsyncIterator[bytes]:
    rid, mid = _ids()
    created = int(time.time())
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return _event({"type": kind, "sequence_number": seq - 1, **fields})

    shell = _response(rid, mid, req, request, created, "in_progress", None, None, 0)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.output_item.added", output_index=0, item=item)
    yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
    texts, reason, n = [], "length", 0
    try:
        async for p in pieces(instance, req, cancel, metrics):
            if p.text:
                texts.append(p.text)
                yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                            delta=p.text, logprobs=[])
            reason, n = p.finish_reason or reason, p.completion_tokens
    except SnapwakeError as exc:
        err = openai_error(exc)[1]["error"]
        yield event("error", code=err["code"], message=err["message"], param=err["param"])
        return
    text = "".join(texts)
    yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[])
    yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                part={**part, "text": text})
    status = "incomplete" if reason == "length" else "completed"
    final = _response(rid, mid, req, request, created, status, text, reason, n)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
