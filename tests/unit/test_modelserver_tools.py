"""Tool calls parsed back from canned model text, per family; the forced-call schema."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from modelserver.demo import _tokenizer_json
from modelserver.tools import (
    ToolCallStream,
    ToolMode,
    fallback_system_message,
    family_of,
    forced_schema,
    parse,
)

HERMES = ToolMode("hermes", forced=False)
LLAMA = ToolMode("llama3", forced=False)
FORCED = ToolMode("hermes", forced=True)


@pytest.fixture(scope="module")
def demo_tokenizer() -> Any:
    """The demo model's byte-level BPE (its tokenizer.json alone: no model, no torch)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


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


# --- streamed: the same canned texts fed token by token, as OpenAI deltas --------------------

def _tokens(text: str, tokenizer: Any) -> list[str]:
    """``text`` as the pieces a model would produce: one token each (the demo tokenizer's)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "".join(pieces) == text and len(pieces) > 5
    return pieces


def _stream(text: str, mode: ToolMode, tokenizer: Any) -> tuple[list[list[dict]], bool]:
    """The deltas after each token (the last entry: ``finish``'s), and whether a call went out."""
    stream = ToolCallStream(mode)
    steps = [stream.feed(piece) for piece in _tokens(text, tokenizer)]
    return [*steps, stream.finish()], stream.called


def _fold(steps: list[list[dict]]) -> tuple[str, list[tuple[str, dict]]]:
    """What a client makes of the deltas (the openai client's rule: fragments join by index);
    checks each call's first delta carries id, type and name, and the later ones arguments only."""
    content, calls = "", {}
    for delta in (d for step in steps for d in step):
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] not in calls:
                assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                calls[tc["index"]] = [tc["function"]["name"], tc["function"]["arguments"]]
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]][1] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]


STREAMED = [
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "a \\" } {"}}\n</tool_call>', HERMES),
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}', HERMES),  # unclosed last block
    ("no calls here, just < and > text", HERMES),
    ("<tool_call>{not json</tool_call>", HERMES),
    ('<|python_tag|>{"name": "search", "parameters": {"q": "cats"}}; {"name": "f", "parameters": {}}', LLAMA),
    ('{"name": "search", "parameters": {"q": "dogs", "n": 3}}', LLAMA),
    ("Sure, here it is: {not a call}", LLAMA),
    ('{"name": "f", "arguments": {"a": "b", "c": {"d": null}}}', FORCED),
    ('{"arguments": {"a": 1}, "name": "late"}', FORCED),  # arguments first: sent whole at the end
]


@pytest.mark.parametrize(("text", "mode"), STREAMED)
def test_streamed_deltas_add_up_to_what_parse_finds(text: str, mode: ToolMode, demo_tokenizer: Any) -> None:
    steps, called = _stream(text, mode, demo_tokenizer)
    content, calls = _fold(steps)
    parsed = parse(text, mode)
    assert calls == _calls(text, mode) and called == bool(parsed.calls)
    assert content.strip() == (parsed.content or "").strip()


def test_a_call_streams_before_it_is_complete(demo_tokenizer: Any) -> None:
    text = STREAMED[0][0]
    steps, _ = _stream(text, HERMES, demo_tokenizer)
    flat = [(i, d) for i, step in enumerate(steps) for d in step]
    first_call = next(i for i, d in flat if "tool_calls" in d)
    # The name goes out before its arguments are complete, and the arguments in several fragments.
    header = next(d for _, d in flat if "tool_calls" in d)["tool_calls"][0]
    assert header["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d for _, d in flat if "tool_calls" in d and d["tool_calls"][0]["index"] == 0][1:]
    assert len(fragments) > 5
    assert first_call < len(_tokens(text[:text.index('"city"')], demo_tokenizer)) + 1
    # The content went out before any call, token by token, without the tag's start.
    contents = [i for i, d in flat if "content" in d]
    assert contents and max(contents) < first_call and len(contents) > 1
    assert all("<" not in d["content"] for _, d in flat if "content" in d)


@pytest.mark.parametrize("mode", [HERMES, LLAMA, FORCED])
def test_long_arguments_stream_in_linear_time(mode: ToolMode) -> None:
    """Each piece reads only what is new: 40k characters of arguments, one at a time, stay fast."""
    code = "x = 1\\n" * 6000  # a JSON string of about 40k characters
    key = "parameters" if mode is LLAMA else "arguments"
    obj = '{"name": "run", "' + key + '": {"code": "' + code + '"}}'
    text = "<tool_call>" + obj + "</tool_call>" if mode is HERMES else obj
    stream = ToolCallStream(mode)
    started = time.monotonic()
    steps = [stream.feed(ch) for ch in text]
    steps.append(stream.finish())
    assert time.monotonic() - started < 5  # quadratic rescans took minutes
    assert _fold(steps)[1] == [("run", {"code": code.replace("\\n", "\n")})]
