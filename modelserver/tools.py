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

__all__ = ["ParsedCalls", "ToolMode", "fallback_system_message", "family_of", "forced_schema", "parse"]

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


def forced_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema of one call to ``name`` (or to any of ``tools`` when None)."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


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
