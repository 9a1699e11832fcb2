"""Sampling: the parameters of one request, and one batched step that picks a token for every
row of a batch's logits.

``sample`` works on the whole ``[S, V]`` logits of a step with tensor operations; the Python
loops are over the batch's rows (a handful of calls each), never over the vocabulary:

1. ``logit_bias``: one sparse add for every biased row;
2. penalties, as vLLM applies them: ``repetition_penalty`` on every token seen in the prompt or
   the output (positive logits divided, negative multiplied), ``frequency_penalty`` times each
   output token's count and ``presence_penalty`` once per output token seen, subtracted;
3. ``response_format`` and forced tool calls: the rows with a grammar get the tokens it forbids
   masked out (xgrammar fills one bitmask row per sequence in C++ and masks them all in one
   call); the chosen token then advances the row's matcher;
4. greedy rows (temperature 0): the argmax;
5. sampled rows: temperature, ``top_k``, ``top_p`` and ``min_p`` as masks over one sort, then
   the exponential race (``argmax(p / q)``, ``q ~ Exp(1)``, which samples from ``p``) with
   ``q`` drawn from each request's own ``torch.Generator``: a seeded request draws the same
   numbers whatever else shares the batch, so it samples the same tokens;
6. logprobs, for the rows that asked: of the model's own distribution (the raw logits, before
   any of the above, as vLLM's default ``raw_logprobs``), the chosen token's and the top ``k``.

The rules for each field live in the shared schema (``snapwake.openai``), which the gateway
applies too; ``from_request`` only turns a validated request into what the engine needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from snapwake.openai import GenerationRequest, validate

__all__ = ["Sampled", "SamplerState", "SamplingParams", "from_request", "parse_sampling", "sample"]


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
    top_k: int = 0
    """0: off."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    """Token ids that end the completion (besides the model's EOS); not part of the output."""
    n: int = 1
    """Choices; they share the prompt's prefill."""
    logprobs: int | None = None
    """None: no logprobs; else how many alternatives each token's entry lists."""
    grammar: Any = field(default=None, compare=False)
    """A compiled xgrammar grammar (``response_format``): every token must follow it."""

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def from_request(request: GenerationRequest) -> SamplingParams:
    """The sampling parameters of a validated request (its endpoint's default ``max_tokens``)."""
    stop = request.stop
    return SamplingParams(
        max_tokens=request.max_new_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()), seed=request.seed,
        stream=request.streaming,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        top_k=max(request.top_k or 0, 0), min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        logit_bias=tuple((int(k), v) for k, v in (request.logit_bias or {}).items()),
        stop_token_ids=frozenset(request.stop_token_ids or ()), n=request.choices,
        logprobs=request.top_logprobs_count)


def parse_sampling(body: dict[str, Any], default_max_tokens: int | None) -> SamplingParams:
    """Validates the sampling fields of a raw body; raises ``InvalidArgument`` naming the field."""
    params = from_request(validate(body, GenerationRequest))
    return params if params.max_tokens is not None else dataclasses.replace(params, max_tokens=default_max_tokens)


@dataclass
class SamplerState:
    """What sampling keeps of one sequence between steps."""

    params: SamplingParams
    prompt: list[int]
    gen: torch.Generator | None = None
    counts: torch.Tensor | None = None
    """Output token counts ``[V]`` (penalised requests only; made at the first step)."""
    seen: torch.Tensor | None = None
    """Prompt tokens ``[V]`` as a mask (``repetition_penalty`` only)."""
    matcher: Any = None
    """This sequence's place in its grammar (an ``xgrammar.GrammarMatcher``)."""

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing may follow."""
        return self.matcher is not None and bool(self.matcher.is_terminated())

    @classmethod
    def create(cls, params: SamplingParams, prompt: list[int], device: torch.device, choice: int = 0) -> SamplerState:
        """Choice ``i`` of a seeded request uses ``seed + i`` (each choice differs, each repeats)."""
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                seed = params.seed + choice
                gen.manual_seed(seed % (1 << 64) if seed >= 1 << 64 else seed)
            else:
                gen.seed()
        matcher = None
        if params.grammar is not None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(params.grammar)
        return cls(params, list(prompt), gen, matcher=matcher)

    def _tensors(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None or self.seen is None:
            self.counts = torch.zeros(vocab, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            if self.params.repetition_penalty != 1.0:
                ids = torch.tensor([t for t in self.prompt if t < vocab], dtype=torch.long, device=device)
                self.seen[ids] = True
        return self.counts, self.seen


@dataclass(frozen=True)
class Sampled:
    """The token picked for one row, with its logprobs when the request asked for them."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _penalise(x: torch.Tensor, rows: list[int], states: list[SamplerState]) -> None:
    vocab, dev = x.shape[1], x.device
    pairs = [states[i]._tensors(vocab, dev) for i in rows]
    counts = torch.stack([c for c, _ in pairs])
    seen = torch.stack([s for _, s in pairs]) | (counts > 0)
    idx = torch.tensor(rows, device=dev)
    sub = x[idx]
    rep = _column([states[i].params.repetition_penalty for i in rows], dev)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= _column([states[i].params.frequency_penalty for i in rows], dev) * counts
    sub -= _column([states[i].params.presence_penalty for i in rows], dev) * (counts > 0)
    x[idx] = sub


def _sample_rows(x: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """One token per row of ``x`` (every row samples: temperature > 0)."""
    dev, vocab = x.device, x.shape[1]
    params = [s.params for s in states]
    unscaled = x
    x = x / _column([p.temperature for p in params], dev)
    # A temperature so small (1e-38) that logits overflow to inf: softmax would give NaNs. Such a
    # row samples greedily (found by the fuzz suite: it stopped the engine for good).
    overflow = (torch.isposinf(x) | torch.isnan(x)).any(dim=-1) | torch.isneginf(x).all(dim=-1)
    if any(p.top_k or p.top_p < 1.0 for p in params):
        ordered, order = torch.sort(x, dim=-1, descending=True)
        ks = torch.tensor([p.top_k or vocab for p in params], device=dev)[:, None]
        ordered = ordered.masked_fill(torch.arange(vocab, device=dev)[None, :] >= ks, float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= _column([p.top_p for p in params], dev)
        drop[:, 0] = False  # a top_p below float32's least value (5e-324) compares as 0
        ordered = ordered.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter_(1, order, ordered)
    probs = torch.softmax(x, dim=-1)
    if any(p.min_p for p in params):
        floor = _column([p.min_p for p in params], dev) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    q = torch.empty_like(probs)
    for row, state in enumerate(states):
        q[row].exponential_(generator=state.gen)
    picked = torch.argmax(probs / q, dim=-1)
    return torch.where(overflow, torch.argmax(unscaled, dim=-1), picked)


def _mask(x: torch.Tensor, rows: list[int], states: list[SamplerState]) -> None:
    """Masks, in place, the tokens each constrained row's grammar forbids next (one C++ fill per
    row, one masking call for all of them)."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(x.shape[0], x.shape[1])
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device), indices=rows)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> list[Sampled]:
    """A token for each row of ``logits`` ``[S, V]`` (row ``i`` is ``states[i]``'s)."""
    dev, vocab = logits.device, logits.shape[1]
    raw = logits.float()
    x = raw
    biased = [i for i, s in enumerate(states) if s.params.logit_bias]
    penalised = [i for i, s in enumerate(states) if s.params.penalised]
    constrained = [i for i, s in enumerate(states) if s.matcher is not None]
    if biased or penalised or constrained:
        x = raw.clone()
    if biased:
        entries = [(i, t, b) for i in biased for t, b in states[i].params.logit_bias if t < vocab]
        rows, cols, vals = zip(*entries, strict=True) if entries else ((), (), ())
        x.index_put_((torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev)),
                     torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)
    if penalised:
        _penalise(x, penalised, states)
    if constrained:
        _mask(x, constrained, states)
    tokens = torch.argmax(x, dim=-1)
    sampled = [i for i, s in enumerate(states) if s.params.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        tokens[idx] = _sample_rows(x[idx], [states[i] for i in sampled])
    want = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    chosen: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    if want:
        idx = torch.tensor(want, device=dev)
        lp = torch.log_softmax(raw[idx], dim=-1)
        chosen = lp.gather(1, tokens[idx][:, None])[:, 0].tolist()
        k = max(states[i].params.logprobs or 0 for i in want)
        if k:
            values, ids = torch.topk(lp, k, dim=-1)
            top_ids, top_lps = ids.tolist(), values.tolist()
    picked = tokens.tolist()  # the step's one device sync
    for i in constrained:
        states[i].matcher.accept_token(picked[i])
    for i in penalised:
        counts = states[i].counts
        assert counts is not None
        counts[picked[i]] += 1
    out = [Sampled(t) for t in picked]
    for j, i in enumerate(want):
        k = states[i].params.logprobs or 0
        top = list(zip(top_ids[j][:k], top_lps[j][:k], strict=True)) if k else []
        out[i] = Sampled(picked[i], chosen[j], top)
    return out
