"""Tool calls: rendering ``tools`` into the prompt, forcing a call, and parsing calls back. Pure
(the grammar is compiled by the caller).

- Rendering: the tools go to the model's own chat template (``tools=``), as vLLM passes them.
  A template that never mentions ``tools`` would drop them silently, so for such a model the
  tools are described in a system message instead, asking for the Hermes format below.
- Parsing, per family (``family_of`` reads the template):
  - ``hermes`` (Qwen2/2.5/3, Hermes, and the fallback): ``<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>`` blocks; the text before the first block is the message's content;
  - ``llama3``: the whole answer is ``{"name": ..., "parameters": {...}}`` (after an optional
    ``<|python_tag|>``), several separated by ``;``.
- Streaming (``ToolCallStream``): the same formats read piece by piece, as OpenAI's deltas (a
  call's id, type and name first, then its arguments in fragments).
- ``required`` and a named ``tool_choice`` are enforced with a grammar (``forced_schema``): the
  answer is one JSON object ``{"name": ..., "arguments": ...}`` that names an allowed tool and
  whose arguments follow its ``parameters`` schema; it is parsed as that call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from snapwake.openai.structured import forced_schema

__all__ = ["ParsedCalls", "ToolCallStream", "ToolMode", "fallback_system_message", "family_of", "forced_schema",
           "parse"]

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolMode:
    """How to read a request's answer for tool calls."""

    family: str
    """``hermes`` or ``llama3``."""
    forced: bool
    """The answer is one grammar-forced JSON call (``required`` or a named choice)."""


@dataclass(frozen=True)
class ParsedCalls:
    content: str | None
    calls: list[dict[str, Any]]
    """OpenAI ``tool_calls`` objects: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""


def family_of(template: str | None) -> str:
    """The tool-call format a chat template teaches its model."""
    if template and "<tool_call>" in template:
        return "hermes"
    if template and ("<|python_tag|>" in template or "<|eom_id|>" in template):
        return "llama3"
    return "hermes"


def renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in str(template)


def fallback_system_message(tools: list[dict[str, Any]]) -> dict[str, str]:
    """A system message describing ``tools`` in the Hermes format, for a template without tools."""
    listed = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
    return {"role": "system", "content": (
        "You may call functions. The available functions:\n" + listed + "\nTo call one, answer with "
        '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>')}


def _call(name: Any, arguments: Any) -> dict[str, Any] | None:
    if not isinstance(name, str) or not name:
        return None
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {},
                                                                   ensure_ascii=False)
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": args}}


def _from_json(text: str, args_key: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    return _call(obj.get("name"), obj.get(args_key, obj.get("arguments", obj.get("parameters"))))


def parse(text: str, mode: ToolMode) -> ParsedCalls:
    """The calls in a model's answer; text that holds none is plain content."""
    if mode.forced:
        call = _from_json(text.strip(), "arguments")
        return ParsedCalls(None, [call]) if call else ParsedCalls(text, [])
    if mode.family == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return ParsedCalls(text, [])
        calls = [_from_json(part.strip(), "parameters") for part in body.split(";") if part.strip()]
        if calls and all(c is not None for c in calls):
            return ParsedCalls(None, [c for c in calls if c is not None])
        return ParsedCalls(text, [])
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedCalls(text, [])
    calls = [_from_json(m.group(1), "arguments") for m in _HERMES.finditer(text, start)]
    found = [c for c in calls if c is not None]
    if not found:
        return ParsedCalls(text, [])
    content = text[:start].strip()
    return ParsedCalls(content or None, found)


# --- streaming: tool calls as incremental deltas ------------------------------------------------

_OPEN, _CLOSE, _PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
_WS = " \t\r\n"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string starting at ``text[i] == '"'``; None if it is not closed yet."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at ``text[i]``; None if it is not complete yet."""
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(text) else None  # a number may go on


def _scan_object(text: str, p: int) -> tuple[dict[str, tuple[int, int | None]], int | None, bool]:
    """The top-level fields of the JSON object starting at ``text[p] == '{'`` as far as it goes:
    key -> (value start, value end or None); the object's end (None: not yet); whether it is malformed."""
    fields: dict[str, tuple[int, int | None]] = {}
    i = p + 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return fields, None, False
        if text[i] == "}":
            return fields, i + 1, False
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return fields, None, True
        key_end = _string_end(text, i)
        if key_end is None:
            return fields, None, False
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return fields, None, True
        i = _skip_ws(text, key_end)
        if i >= len(text):
            return fields, None, False
        if text[i] != ":":
            return fields, None, True
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return fields, None, False
        end = _value_end(text, i)
        fields[str(key)] = (i, end)
        if end is None:
            return fields, None, False
        i = end


class _Scanner:
    """Where the JSON value starting at ``start`` ends, found resumably: each character is read
    once however often the text grows (a call's arguments may run to thousands of tokens)."""

    def __init__(self, start: int) -> None:
        self.start = self.pos = start
        self.depth = 0
        self.in_str = self.esc = False
        self.end: int | None = None

    def advance(self, text: str) -> int | None:
        if self.end is not None or self.pos >= len(text):
            return self.end
        if self.pos == self.start and text[self.start] not in '{["':  # a number or literal: short
            end = _value_end(text, self.start)
            self.end = end
            return end
        i, n = self.pos, len(text)
        while i < n:
            c = text[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        self.end = i + 1
                        break
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
                    break
            i += 1
        self.pos = i
        return self.end


# Before a call's name and arguments are known, its object is parsed from its start on each
# piece; past this many characters without them, the call goes out whole when its object ends.
_HEADER_SCAN_CHARS = 4096


@dataclass
class _StreamedCall:
    """One call being streamed: where its object starts and ends, what went out of it."""

    start: int
    obj: _Scanner
    index: int = 0
    header_sent: bool = False
    args: _Scanner | None = None
    args_sent: int = 0
    done: bool = False


class ToolCallStream:
    """A model's answer read piece by piece, as OpenAI streaming deltas: content as it comes (text
    that may be the start of a tool-call tag is held back), then per call a first delta with its
    ``index``, ``id``, ``type`` and ``function.name`` (once the name is complete and its arguments
    have begun), then ``function.arguments`` fragments, the arguments exactly as the model writes
    them. A call whose arguments come before its name goes out whole when its object closes.

    ``feed`` takes the next text and returns the deltas it allows; ``finish`` returns the rest;
    ``called`` says whether a call went out (the finish reason is then ``tool_calls``). Concatenated,
    the deltas give the calls ``parse`` finds in the whole text, and its content (hermes: the text
    before the first call; a malformed call's text is content, as ``parse`` has it)."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self.calls: list[_StreamedCall] = []
        self.content_sent = 0
        """Chars of ``text`` handled as content (sent, or skipped whitespace)."""
        self.kind: str | None = "json" if mode.forced else None
        """hermes: content until a tag; llama3: "json" (calls) or "content", once known."""
        self.args_keys = ("arguments",) if mode.forced or mode.family == "hermes" else ("parameters", "arguments")

    @property
    def called(self) -> bool:
        return any(c.header_sent for c in self.calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        return self._advance(final=False)

    def finish(self) -> list[dict[str, Any]]:
        return self._advance(final=True)

    # -- internals

    def _content(self, upto: int, final: bool, hold: str | None) -> list[dict[str, Any]]:
        """Content up to ``upto``, holding back trailing whitespace and a prefix of ``hold`` unless final."""
        end = upto
        if not final:
            if hold is not None:
                for k in range(min(len(hold) - 1, end - self.content_sent), 0, -1):
                    if hold.startswith(self.text[end - k:end]):
                        end -= k
                        break
            while end > self.content_sent and self.text[end - 1] in _WS:
                end -= 1
        if self.content_sent == 0:  # leading whitespace is no content (``parse`` strips it)
            self.content_sent = _skip_ws(self.text[:end], 0) if end else 0
        piece = self.text[self.content_sent:end]
        self.content_sent = max(self.content_sent, end)
        return [{"content": piece}] if piece else []

    def _advance(self, final: bool) -> list[dict[str, Any]]:
        if self.mode.forced:
            return self._json_calls(final)
        if self.mode.family == "llama3":
            if self.kind is None:
                head = self.text.lstrip()
                body = head.removeprefix(_PYTHON_TAG).lstrip()
                if not final and (not head or (len(head) < len(_PYTHON_TAG) and _PYTHON_TAG.startswith(head))
                                  or (head.startswith(_PYTHON_TAG) and not body)):
                    return []  # not known yet: a call, or content
                self.kind = "json" if body.startswith("{") else "content"
            if self.kind == "content":
                piece = self.text[self.content_sent:]
                self.content_sent = len(self.text)
                return [{"content": piece}] if piece else []
            return self._json_calls(final)
        return self._hermes(final)

    def _hermes(self, final: bool) -> list[dict[str, Any]]:
        first = self.text.find(_OPEN)
        if first < 0:
            return self._content(len(self.text), final, _OPEN)
        out = self._content(first, False, None)  # the content is what comes before the first call
        pos = first
        while (tag := self.text.find(_OPEN, pos)) >= 0:
            body = _skip_ws(self.text, tag + len(_OPEN))
            close = self.text.find(_CLOSE, body)
            if body < len(self.text) and self.text[body] == "{":
                out += self._stream_call(self._call_at(body), final or close >= 0)
            if close < 0:
                break
            pos = close + len(_CLOSE)
        if final and not self.called:  # nothing parsed as a call: the rest is content, as ``parse`` says
            rest = self.text[self.content_sent:]
            self.content_sent = len(self.text)
            if rest.strip():
                out.append({"content": rest})
        return out

    def _json_calls(self, final: bool) -> list[dict[str, Any]]:
        """Calls written as bare JSON objects (llama3: after an optional python tag, ``;`` between)."""
        out: list[dict[str, Any]] = []
        i = self.text.find("{")
        while 0 <= i < len(self.text):
            call = self._call_at(i)
            out += self._stream_call(call, final)
            end = call.obj.end
            if end is None:
                break
            i = _skip_ws(self.text, end)
            if i < len(self.text) and self.text[i] == ";":
                i = _skip_ws(self.text, i + 1)
            if i >= len(self.text) or self.text[i] != "{":
                break
        return out

    def _call_at(self, start: int) -> _StreamedCall:
        if self.calls and self.calls[-1].start == start:
            return self.calls[-1]
        for call in self.calls:
            if call.start == start:
                return call
        call = _StreamedCall(start, _Scanner(start))  # its index is set when its first delta goes out
        self.calls.append(call)
        return call

    def _stream_call(self, call: _StreamedCall, closed: bool) -> list[dict[str, Any]]:
        if call.done:
            return []
        out: list[dict[str, Any]] = []
        end = call.obj.advance(self.text)
        index = sum(1 for c in self.calls if c.header_sent)
        if not call.header_sent and call.args is None and len(self.text) - call.start <= _HEADER_SCAN_CHARS:
            fields, _, bad = _scan_object(self.text, call.start)
            name = fields.get("name")
            args_key = next((k for k in self.args_keys if k in fields), None)
            if name is not None and name[1] is not None and args_key is not None and not bad:
                try:
                    fn_name = json.loads(self.text[name[0]:name[1]])
                except ValueError:
                    fn_name = None
                if isinstance(fn_name, str) and fn_name:
                    call.header_sent, call.index, call.args = True, index, _Scanner(fields[args_key][0])
                    out.append({"tool_calls": [{"index": index, "id": "call_" + uuid.uuid4().hex[:24],
                                                "type": "function", "function": {"name": fn_name, "arguments": ""}}]})
        if call.header_sent and call.args is not None:
            stop = call.args.advance(self.text)
            upto = stop if stop is not None else len(self.text)
            piece = self.text[call.args.start + call.args_sent:upto]
            if piece:
                call.args_sent += len(piece)
                out.append({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]})
        if end is not None or closed:
            call.done = True
            if not call.header_sent and end is not None:  # arguments before the name, or a long prefix: whole
                whole = _from_json(self.text[call.start:end], self.args_keys[0])
                if whole is not None:
                    call.header_sent, call.index = True, index
                    out.append({"tool_calls": [{"index": index, **whole}]})
        return out
