"""Seeded sporadic, bursty multi-model request traces, and what a static deployment would need.

Each model gets its own on/off arrival process (a two-state Markov-modulated Poisson process
whose off state sends nothing): while "on" it sends Poisson arrivals at ``burstiness`` times its
mean rate, and it is "on" ``1 / burstiness`` of the time, so its long-run mean rate is kept.
``burstiness`` 1 is plain Poisson; larger values give quiet stretches and short bursts, which is
what serverless traces look like (most models idle most of the time). Mean rates follow a Zipf
law over the models, so a few are popular and most are sporadic.

The same ``TraceParams`` (seed included) always gives the same list of events, on any platform:
only ``random.Random`` seeded from a string is used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from snapwake.errors import InvalidArgument

__all__ = ["Event", "TraceParams", "generate", "requests_per_model", "static_busy_fraction",
           "static_gpus_needed", "zipf_weights"]


class Event(NamedTuple):
    """One request of the trace."""

    t_offset_s: float
    """Seconds after the start of the replay at which the request is sent."""
    model_index: int
    """Which model (0 .. n_models-1) it goes to."""
    prompt_len: int
    """Rough prompt length in words."""
    max_tokens: int
    """``max_tokens`` of the request."""


@dataclass(frozen=True)
class TraceParams:
    """Shape of a trace."""

    n_models: int
    """How many models the trace spreads over."""
    duration_s: float
    """Length of the trace; every event has ``t_offset_s < duration_s``."""
    rate: float
    """Mean total request rate over all models, in requests per second."""
    burstiness: float = 4.0
    """On-state rate over mean rate (>= 1); 1 is Poisson, larger is burstier and sparser."""
    mean_on_s: float = 2.0
    """Mean length of an on period (burst), in seconds."""
    zipf_s: float = 1.0
    """Zipf exponent of model popularity (0 spreads the load evenly)."""
    prompt_len: tuple[int, int] = (8, 64)
    """Inclusive range of prompt lengths, drawn uniformly."""
    max_tokens: tuple[int, int] = (4, 32)
    """Inclusive range of ``max_tokens``, drawn uniformly."""
    seed: int = 0

    def validate(self) -> TraceParams:
        """Returns self, or raises ``InvalidArgument`` naming the bad field."""
        checks = [("n_models", self.n_models >= 1), ("duration_s", self.duration_s > 0),
                  ("rate", self.rate > 0), ("burstiness", self.burstiness >= 1),
                  ("mean_on_s", self.mean_on_s > 0), ("zipf_s", self.zipf_s >= 0),
                  ("prompt_len", 1 <= self.prompt_len[0] <= self.prompt_len[1]),
                  ("max_tokens", 1 <= self.max_tokens[0] <= self.max_tokens[1])]
        for field, ok in checks:
            if not ok:
                raise InvalidArgument(f"trace {field} is out of range: {getattr(self, field)!r}", field=field)
        return self


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n under Zipf(s), normalised to sum to 1."""
    raw = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _model_events(p: TraceParams, index: int, mean_rate: float) -> list[Event]:
    # One generator per model, so adding a model does not reshuffle the others' arrivals.
    rng = random.Random(f"snapwake-trace:{p.seed}:{index}")
    on_rate = mean_rate * p.burstiness
    mean_off_s = p.mean_on_s * (p.burstiness - 1)
    on = p.burstiness == 1 or rng.random() < 1 / p.burstiness  # start in the stationary mix
    t, out = 0.0, []
    while t < p.duration_s:
        if not on:
            t += rng.expovariate(1 / mean_off_s)
            on = True
            continue
        end = t + rng.expovariate(1 / p.mean_on_s) if p.burstiness > 1 else p.duration_s
        while True:
            t += rng.expovariate(on_rate)
            if t >= min(end, p.duration_s):
                break
            out.append(Event(round(t, 6), index, rng.randint(*p.prompt_len), rng.randint(*p.max_tokens)))
        t, on = end, False
    return out


def generate(params: TraceParams) -> list[Event]:
    """The trace's events, sorted by time (then model)."""
    p = params.validate()
    weights = zipf_weights(p.n_models, p.zipf_s)
    events = [e for i, w in enumerate(weights) for e in _model_events(p, i, p.rate * w)]
    return sorted(events)


def requests_per_model(trace: Sequence[Event], n_models: int) -> list[int]:
    """How many requests each model receives."""
    counts = [0] * n_models
    for e in trace:
        counts[e.model_index] += 1
    return counts


def static_gpus_needed(trace: Sequence[Event]) -> int:
    """GPUs a static one-model-per-GPU deployment needs: one per model that gets any request."""
    return len({e.model_index for e in trace})


def static_busy_fraction(trace: Sequence[Event], duration_s: float,
                         service_s: float | Sequence[float]) -> float:
    """Average busy fraction per GPU of the static deployment.

    Each used GPU is busy ``requests * service_s`` seconds of ``duration_s`` (at most all of it);
    ``service_s`` is one time for every model or one per model index.
    """
    if duration_s <= 0:
        raise InvalidArgument("duration_s must be positive", field="duration_s")
    counts: dict[int, int] = {}
    for e in trace:
        counts[e.model_index] = counts.get(e.model_index, 0) + 1
    if not counts:
        return 0.0
    per = (lambda i: service_s) if isinstance(service_s, (int, float)) else (lambda i: service_s[i])
    busy = [min(1.0, n * per(i) / duration_s) for i, n in counts.items()]
    return sum(busy) / len(busy)
