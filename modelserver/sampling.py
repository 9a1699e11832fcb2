"""Sampling parameters of one request, validated from an OpenAI request body. Pure.

Unknown fields are accepted (clients send many); known ones are checked and a bad one raises
``InvalidArgument`` with ``field`` set to its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapwake.errors import InvalidArgument

__all__ = ["SamplingParams", "parse_sampling"]

MAX_STOPS = 4


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


def _number(body: dict[str, Any], field: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{field} must be a number", field=field)
    if value > hi or value < lo or (lo_open and value == lo):
        raise InvalidArgument(f"{field} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", field=field)
    return float(value)


def _int(body: dict[str, Any], field: str, lo: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field} must be an integer", field=field)
    if value < lo:
        raise InvalidArgument(f"{field} must be >= {lo}, got {value}", field=field)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument("stop must be a string or a list of strings", field="stop")
    if len(stops) > MAX_STOPS:
        raise InvalidArgument(f"stop takes at most {MAX_STOPS} strings", field="stop")
    if any(s == "" for s in stops):
        raise InvalidArgument("stop strings must not be empty", field="stop")
    return tuple(stops)


def parse_sampling(body: dict[str, Any], default_max_tokens: int | None) -> SamplingParams:
    """Validates the sampling fields common to chat and text completions."""
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise InvalidArgument("only n=1 is supported", field="n")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise InvalidArgument("stream must be a boolean", field="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise InvalidArgument("stream_options is an object and needs stream=true", field="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument("seed must be an integer", field="seed")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stop(body.get("stop")), seed=seed, stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage", False)))
