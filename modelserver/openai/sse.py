"""Server-sent events framing and the OpenAI response objects. Pure."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE", "chat_chunk", "completion_chunk", "event", "usage"]

DONE = b"data: [DONE]\n\n"


def event(obj: dict[str, Any]) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The OpenAI usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None, use: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion`` object; ``text=None`` makes the usage-only chunk."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                        "finish_reason": finish_reason}]
    obj: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj
