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
               finish_reason: str | None, use: dict[str, int] | None = None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
                     use: dict[str, int] | None = None, index: int = 0,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion`` object; ``text=None`` makes the usage-only chunk."""
    choices = [] if text is None else [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]
    obj: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]]) -> dict[str, Any]:
    """The chat ``logprobs`` object of some tokens: ``(text, logprob, [(alternative, logprob)])``."""
    return {"content": [{**_entry(text, lp), "top_logprobs": [_entry(t, v) for t, v in top]}
                        for text, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list[tuple[str, float, list[tuple[str, float]]]], offset: int) -> dict[str, Any]:
    """The completions ``logprobs`` object of some tokens, the first at text offset ``offset``."""
    offsets = []
    for text, _, _ in entries:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{t: v for t, v in top} for _, _, top in entries], "text_offset": offsets}
