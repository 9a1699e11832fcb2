"""The gateway's edge limits, for every function: what one request may ask, and how often a key may ask.

Pure and synchronous (the clock is passed in), so they are tested with tables; the HTTP edge
(``api_router``, ``middleware``) applies them:

- the body size: ``max_body_bytes``, counted while the body streams in (``api_router``), 413;
- JSON nesting: ``snapwake.openai.parse_json`` (``MAX_JSON_DEPTH``), 400 naming ``body``;
- ``check_body``: the number of messages, the prompt's length, ``max_tokens`` /
  ``max_completion_tokens`` and ``n`` against their caps, 400 naming the field. A value over
  a cap is refused, never lowered: the client asked for it and must hear that it cannot have it.
  These run on every function's body, user images included, before the function is looked up.
- ``KeyLimiter``: a token bucket (requests per second and a burst) and a cap on requests in
  flight, per API key, 429 with ``Retry-After``. The state lives in one gateway replica: with N
  replicas behind a load balancer a key gets up to N times the rate. That is the documented
  contract; a cluster-wide limit would need shared state on every request's path.

A cap of 0 turns that limit off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from snapwake import errors

__all__ = ["EdgeLimits", "KeyLimiter", "Refusal", "TokenBucket", "check_body"]


@dataclass(frozen=True)
class EdgeLimits:
    """The caps ``check_body`` applies (0: no cap)."""

    max_messages: int = 0
    """Entries in ``messages``."""
    max_prompt_chars: int = 0
    """Characters of text in ``messages`` (all of them) or in ``prompt``; token ids count one each."""
    max_tokens: int = 0
    """``max_tokens`` and ``max_completion_tokens``."""
    max_n: int = 0
    """``n``."""


def _text_length(content: Any) -> int:
    """Characters of a message's content (a string or a list of text parts); other shapes are the schema's."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _prompt_length(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(_prompt_length(p) if isinstance(p, str | list) else 1 for p in prompt)
    return 0


def _over(value: Any, cap: int) -> bool:
    """An integer over a non-zero cap (a value of the wrong type is the schema's to refuse)."""
    return bool(cap) and isinstance(value, int) and not isinstance(value, bool) and value > cap


def check_body(body: dict[str, Any], limits: EdgeLimits) -> None:
    """``InvalidArgument`` naming the first field over its cap."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if limits.max_messages and len(messages) > limits.max_messages:
            raise errors.InvalidArgument(f"messages: {len(messages)} messages is over the limit of "
                                         f"{limits.max_messages}", field="messages")
        chars = sum(_text_length(m.get("content")) for m in messages if isinstance(m, dict))
        if limits.max_prompt_chars and chars > limits.max_prompt_chars:
            raise errors.InvalidArgument(f"messages: {chars} characters of text is over the limit of "
                                         f"{limits.max_prompt_chars}", field="messages")
    if "prompt" in body and limits.max_prompt_chars:
        length = _prompt_length(body["prompt"])
        if length > limits.max_prompt_chars:
            raise errors.InvalidArgument(f"prompt: length {length} is over the limit of {limits.max_prompt_chars}",
                                         field="prompt")
    for name, cap in (("max_tokens", limits.max_tokens), ("max_completion_tokens", limits.max_tokens),
                      ("n", limits.max_n)):
        if _over(body.get(name), cap):
            raise errors.InvalidArgument(f"{name}: {body[name]} is over this gateway's limit of {cap}", field=name)


@dataclass
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each request takes one."""

    rate: float
    burst: int
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def take(self, now: float) -> float:
        """0 when a token was taken; else the seconds until one will be there (nothing is taken)."""
        if self.tokens < 0:  # new: full
            self.tokens, self.updated = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Refusal(NamedTuple):
    """Why ``KeyLimiter.admit`` refused: the caller answers 429 with ``Retry-After: retry_after``."""

    retry_after: int  # whole seconds, at least 1
    message: str
    in_flight: bool  # the cap on requests in flight (else the rate)


class KeyLimiter:
    """Per key: a ``TokenBucket`` (``rate`` 0: none) and at most ``concurrent`` in flight (0: no cap).

    ``admit`` returns None and counts the request in flight (the caller must ``done`` it), or a
    ``Refusal``. Keys come from the configured key set
    (or the one anonymous key with auth off), so the tables stay as small as the config."""

    def __init__(self, rate: float, burst: int, concurrent: int, retry_after: int = 1) -> None:
        self.rate, self.burst, self.concurrent = rate, max(burst, 1), concurrent
        self.retry_after = max(retry_after, 1)
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def admit(self, key: str, now: float) -> Refusal | None:
        """None when admitted (and counted in flight), else why not."""
        if self.concurrent and self.in_flight(key) >= self.concurrent:
            return Refusal(self.retry_after, f"this API key has {self.concurrent} requests in flight, "
                                             "the limit", in_flight=True)
        if self.rate:
            wait = self._buckets.setdefault(key, TokenBucket(self.rate, self.burst)).take(now)
            if wait:
                return Refusal(max(1, math.ceil(wait)), f"this API key is over {self.rate:g} requests/s "
                                                        f"(burst {self.burst})", in_flight=False)
        self._in_flight[key] = self.in_flight(key) + 1
        return None

    def done(self, key: str) -> None:
        left = self.in_flight(key) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
