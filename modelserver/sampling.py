"""Sampling parameters of one request, from its validated OpenAI body. Pure.

The rules live in the shared schema (``snapwake.openai``), which the gateway applies too; this
module only turns a validated request into what the engine needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from snapwake.openai import GenerationRequest, validate

__all__ = ["SamplingParams", "from_request", "parse_sampling"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion."""

    max_tokens: int | None
    """Cap on generated tokens; None means up to the context length."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Strings that end the completion; they are not part of the output."""
    seed: int | None = None
    """Seeds a per-request generator so the same request samples the same tokens."""
    stream: bool = False
    include_usage: bool = False


def from_request(request: GenerationRequest) -> SamplingParams:
    """The sampling parameters of a validated request (its endpoint's default ``max_tokens``)."""
    stop = request.stop
    return SamplingParams(
        max_tokens=request.max_new_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), seed=request.seed,
        stream=request.streaming,
        include_usage=bool(request.stream_options and request.stream_options.include_usage))


def parse_sampling(body: dict[str, Any], default_max_tokens: int | None) -> SamplingParams:
    """Validates the sampling fields of a raw body; raises ``InvalidArgument`` naming the field."""
    params = from_request(validate(body, GenerationRequest))
    return params if params.max_tokens is not None else dataclasses.replace(params, max_tokens=default_max_tokens)
