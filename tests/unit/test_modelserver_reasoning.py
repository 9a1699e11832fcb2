"""Qwen3-style reasoning split from the answer, whole and streamed in every cut."""

from __future__ import annotations

from typing import Any

import pytest

from modelserver.reasoning import ReasoningSplitter, is_reasoning_template, opened_in_prompt, split


@pytest.mark.parametrize(("text", "inside", "want"), [
    ("<think>\nLet me see.\n</think>\n\nParis.", False, ("Let me see.", "Paris.")),
    ("Let me see.\n</think>\n\nParis.", True, ("Let me see.", "Paris.")),  # the prompt opened the block
    ("Paris.", False, (None, "Paris.")),  # enable_thinking false: no block
    ("<think>\nstill thinking", False, ("still thinking", "")),  # cut at max_tokens
    ("a </think> b", False, (None, "a </think> b")),  # a block never opened is answer
])
def test_split_whole_outputs(text: str, inside: bool, want: tuple) -> None:
    assert split(text, inside) == want


@pytest.mark.parametrize(("text", "inside"), [
    ("<think>\nLet me see.\n</think>\n\nParis.", False),
    ("Let me see.\n</think>\n\nParis.", True),
    ("Paris, of course.", False),
    ("<think>\nno end", False),
])
def test_streamed_pieces_split_as_the_whole(text: str, inside: bool) -> None:
    reasoning, answer = split(text, inside)
    for size in (1, 2, 3, 5, 100):
        splitter = ReasoningSplitter(inside)
        got_r, got_a = "", ""
        for i in range(0, len(text), size):
            r, a = splitter.feed(text[i:i + size])
            got_r, got_a = got_r + r, got_a + a
        r, a = splitter.flush()
        got_r, got_a = got_r + r, got_a + a
        assert (got_r.strip("\n") or None, got_a) == (reasoning, answer), size


def test_templates_and_prompts() -> None:
    qwen3 = "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    assert is_reasoning_template(qwen3) and not is_reasoning_template("{{ messages }}")
    assert opened_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not opened_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opened_in_prompt("<|im_start|>assistant\n")


QWEN3_TAIL = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking is defined and enable_thinking is false %}"
              "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")


def test_enable_thinking_switches_where_the_output_starts(demo_model_dir: Any) -> None:
    from modelserver.__main__ import load_tokenizer
    from modelserver.openai.requests import prepare_chat

    tok = load_tokenizer(demo_model_dir)
    tok.chat_template = QWEN3_TAIL
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert prepare_chat(body, tok, 512).reasoning is True  # thinking: the output starts inside <think>
    off = prepare_chat({**body, "chat_template_kwargs": {"enable_thinking": False}}, tok, 512)
    assert off.reasoning is False
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert prepare_chat(body, tok, 512).reasoning is None  # not a reasoning model
