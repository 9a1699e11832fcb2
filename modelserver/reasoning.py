"""Reasoning output (Qwen3's ``<think>...</think>``) split from the answer, as vLLM's Qwen3
reasoning parser splits it. Pure.

A chat template that writes ``<think>`` marks a reasoning model. Its output is reasoning up to
``</think>`` and the answer after it; the opening ``<think>`` may be in the output or already in
the prompt (then the output starts inside the reasoning). With ``enable_thinking: false`` in
``chat_template_kwargs`` the template closes an empty block in the prompt, and the output is all
answer. ``ReasoningSplitter`` does the same over streamed pieces, holding back a tail that could
be the start of ``</think>``.
"""

from __future__ import annotations

__all__ = ["ReasoningSplitter", "is_reasoning_template", "opened_in_prompt", "split"]

_OPEN, _CLOSE = "<think>", "</think>"


def is_reasoning_template(template: str | None) -> bool:
    return bool(template) and _CLOSE in str(template)


def opened_in_prompt(prompt: str) -> bool:
    """Whether the rendered prompt leaves a ``<think>`` block open (the output starts inside it)."""
    return prompt.rfind(_OPEN) > prompt.rfind(_CLOSE)


def split(text: str, inside: bool = False) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a whole output; ``inside``: the prompt opened the block. An
    output that opens no block (and starts outside one) is all answer; a block never closed is
    all reasoning (as vLLM's Qwen3 parser returns it)."""
    stripped = text.lstrip()
    if not inside and not stripped.startswith(_OPEN):
        return None, text
    body = stripped[len(_OPEN):] if stripped.startswith(_OPEN) else text
    if _CLOSE in body:
        reasoning, answer = body.split(_CLOSE, 1)
        return reasoning.strip("\n") or None, answer.lstrip("\n")
    return body.strip("\n") or None, ""


class ReasoningSplitter:
    """Feeds streamed pieces in, gets ``(reasoning, answer)`` deltas out (as ``split`` cuts)."""

    def __init__(self, inside: bool = False) -> None:
        self._held = ""
        self._answering = False
        self._started = inside
        self._strip_answer = False

    def feed(self, piece: str) -> tuple[str, str]:
        if self._answering:
            if self._strip_answer:  # the newlines right after </think> are not part of the answer
                piece = piece.lstrip("\n")
                self._strip_answer = not piece
            return "", piece
        text = self._held + piece
        if not self._started:
            stripped = text.lstrip()
            if len(stripped) < len(_OPEN) and _OPEN.startswith(stripped):
                self._held = text  # could still be the opening tag
                return "", ""
            self._started = True
            if not stripped.startswith(_OPEN):
                self._held, self._answering = "", True
                return "", text
            text = stripped[len(_OPEN):]
        if _CLOSE in text:
            reasoning, answer = text.split(_CLOSE, 1)
            self._held, self._answering = "", True
            answer = answer.lstrip("\n")
            self._strip_answer = not answer
            return reasoning, answer
        keep = next((k for k in range(min(len(_CLOSE) - 1, len(text)), 0, -1) if text.endswith(_CLOSE[:k])), 0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._answering or not self._started:
            return "", held
        return held, ""
