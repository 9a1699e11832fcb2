"""The ``model`` field between a client and a user image (pure).

A user image's server knows its model by its own name (``FunctionSpec.served_model_name``); the
client knows the function by its public model id. Requests go out with the served name, and the
top-level ``model`` of every answer (a JSON body, or each ``data:`` event of a stream) comes back
with the name the client used.

Answers are rewritten in place: the scanner reads the top-level members only up to ``model``
and splices its value, so every other byte (numbers, key order, escapes) passes unchanged and a
chunk's ``choices`` after ``model`` are never parsed. A stream is handled a line at a time
(lines split across network chunks are joined first; a line longer than ``max_line`` is passed
on unchanged rather than held), so nothing but the current line is ever buffered.
"""

from __future__ import annotations

import json
import json.decoder
import re
from collections.abc import Callable
from typing import Any

__all__ = ["ModelRewrite", "SseRewriter", "replace_model"]

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_NEEDLE = b'"model"'
# The decoder's own string scanner (C): (value, index after the closing quote). Untyped in typeshed.
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def replace_model(text: str, model: str) -> str | None:
    """``text`` (a JSON object) with its top-level string ``model`` set to ``model``; None when
    it is not an object with one (then it is passed on as it is)."""
    try:
        return _replace(text, model)
    except (ValueError, IndexError):  # not JSON, or cut short: not ours to fix
        return None


def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # matches the empty string too


def _replace(text: str, model: str) -> str | None:
    i = _skip(text, 0)
    if text[i] != "{":
        return None
    i = _skip(text, i + 1)
    while text[i] == '"':
        key, i = scanstring(text, i + 1)
        i = _skip(text, i)
        if text[i] != ":":
            return None
        i = _skip(text, i + 1)
        if key == "model":
            if text[i] != '"':
                return None
            _, end = scanstring(text, i + 1)
            return text[:i] + json.dumps(model) + text[end:]
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] != ",":
            return None
        i = _skip(text, i + 1)
    return None


def _rewrite_json(data: bytes, model: str) -> bytes:
    if _NEEDLE not in data:  # most bodies and events are decided by this alone
        return data
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data
    out = replace_model(text, model)
    return data if out is None else out.encode()


class SseRewriter:
    """Rewrites the ``model`` of each ``data:`` event of a stream fed in arbitrary pieces."""

    def __init__(self, model: str, max_line: int = 1 << 20) -> None:
        self.model, self.max_line = model, max_line
        self._line = bytearray()
        self._passing = False  # inside a line longer than max_line: relayed as it comes

    def feed(self, chunk: bytes) -> bytes:
        """The bytes that may go out now: every complete line, rewritten."""
        out = bytearray()
        while chunk:
            end = chunk.find(b"\n")
            if self._passing:
                out += chunk if end < 0 else chunk[:end + 1]
                self._passing = end < 0
            elif end < 0:
                self._line += chunk
                if len(self._line) > self.max_line:
                    out += self._line
                    self._line.clear()
                    self._passing = True
            else:
                self._line += chunk[:end + 1]
                out += self._event_line(bytes(self._line))
                self._line.clear()
            chunk = b"" if end < 0 else chunk[end + 1:]
        return bytes(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream (a last line without its newline)."""
        rest, self._line = bytes(self._line), bytearray()
        return self._event_line(rest) if rest else b""

    def _event_line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        body = line.rstrip(b"\r\n")
        start = 6 if body.startswith(b"data: ") else 5
        data = body[start:]
        if data == b"[DONE]":
            return line
        new = _rewrite_json(data, self.model)
        return line if new is data else body[:start] + new + line[len(body):]


class ModelRewrite:
    """The ``model`` of one request to a user image: ``served`` going out (unless empty),
    ``public`` (what the client sent) coming back."""

    def __init__(self, public: str, served: str) -> None:
        self.public, self.served = public, served

    def request(self, body: dict[str, Any], raw: bytes) -> bytes:
        """The request body to send; ``raw`` unchanged when there is nothing to rename."""
        if not self.served or body.get("model") == self.served:
            return raw
        return json.dumps({**body, "model": self.served}).encode()

    def response(self, content: bytes, content_type: str) -> bytes:
        """A whole answer (JSON, or a stream read at once)."""
        if content_type.startswith("text/event-stream"):
            sse = self.stream()
            return sse.feed(content) + sse.flush()
        return _rewrite_json(content, self.public)

    def stream(self) -> SseRewriter:
        return SseRewriter(self.public)
