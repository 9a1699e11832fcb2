"""Tool calls parsed back from canned model text, per family; the forced-call schema."""

from __future__ import annotations

import json

import pytest

from modelserver.tools import ToolMode, fallback_system_message, family_of, forced_schema, parse

HERMES = ToolMode("hermes", forced=False)
LLAMA = ToolMode("llama3", forced=False)
FORCED = ToolMode("hermes", forced=True)


def _calls(text: str, mode: ToolMode) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parse(text, mode).calls]


def test_hermes_qwen_blocks_with_leading_content() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    parsed = parse(text, HERMES)
    assert parsed.content == "Let me check."
    assert _calls(text, HERMES) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.calls)
    assert len({c["id"] for c in parsed.calls}) == 2


def test_hermes_unclosed_last_block_and_plain_text() -> None:
    assert _calls('<tool_call>{"name": "f", "arguments": {"x": 1}}', HERMES) == [("f", {"x": 1})]
    assert parse("no calls here", HERMES).calls == []
    assert parse("no calls here", HERMES).content == "no calls here"
    broken = "<tool_call>{not json</tool_call>"
    assert parse(broken, HERMES).calls == [] and parse(broken, HERMES).content == broken


def test_llama3_json_calls() -> None:
    text = '<|python_tag|>{"name": "search", "parameters": {"q": "cats"}}; {"name": "f", "parameters": {}}'
    assert _calls(text, LLAMA) == [("search", {"q": "cats"}), ("f", {})]
    assert parse("Sure, here it is.", LLAMA).calls == []
    assert parse('{"name": "f", "parameters": {}} trailing', LLAMA).calls == []


def test_forced_call_is_one_json_object() -> None:
    assert _calls('{"name": "f", "arguments": {"a": "b"}}', FORCED) == [("f", {"a": "b"})]
    assert parse('{"name": "f", "argu', FORCED).calls == []  # cut at max_tokens: content, no call


@pytest.mark.parametrize(("template", "family"), [
    ("{% for t in tools %}{{ t }}{% endfor %}<tool_call>", "hermes"),
    ("<|python_tag|>{{ tools }}", "llama3"),
    (None, "hermes"),
])
def test_family_from_the_template(template: str | None, family: str) -> None:
    assert family_of(template) == family


def test_forced_schema_names_the_tool_and_its_parameters() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "a", "parameters": params}},
             {"type": "function", "function": {"name": "b"}}]
    one = forced_schema(tools, "a")
    assert one["properties"] == {"name": {"const": "a"}, "arguments": params}
    both = forced_schema(tools, None)
    assert [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["a", "b"]
    assert "a" in fallback_system_message(tools)["content"]
