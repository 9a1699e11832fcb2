"""The token loop: prefill, then one token at a time with a KV cache, sampling and stop strings.

Synchronous and single-request: callers run it in a worker thread and serialise requests (see
``runtime.instance``). ``cancel`` is checked between tokens, so a disconnected client stops
generation within one decode step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from runtime.sampling import SamplingParams
from runtime.stops import StopFilter

__all__ = ["Engine", "Piece", "next_token"]


@dataclass(frozen=True)
class Piece:
    """Text produced since the last piece; the last piece carries ``finish_reason``."""

    text: str
    finish_reason: str | None
    completion_tokens: int


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Picks the next token from 1-D logits: greedy at temperature 0, else top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    """Generates completions with a bound model and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: set[int], max_context: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[Piece]:
        """Yields text pieces; the last one has ``finish_reason`` "stop" or "length"."""
        device = self.device()
        limit = self.max_context - len(prompt_ids)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        stops = StopFilter(params.stop)
        out: list[int] = []
        sent = ""
        reason = "length"
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=device)
            past = None
            while len(out) < limit:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                res = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = next_token(res.logits[0, -1], params, gen)
                if tok in self.eos_ids:
                    reason = "stop"
                    break
                out.append(tok)
                ids = torch.tensor([[tok]], device=device)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for the next token
                piece = stops.feed(text[len(sent):])
                sent = text
                if stops.stopped:
                    yield Piece(piece, "stop", len(out))
                    return
                if piece:
                    yield Piece(piece, None, len(out))
        tail = self.tokenizer.decode(out, skip_special_tokens=True)[len(sent):] if out else ""
        text = stops.feed(tail) + stops.flush()
        yield Piece(text, "stop" if stops.stopped else reason, len(out))
