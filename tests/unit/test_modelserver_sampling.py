"""The batched sampling step (``modelserver.sampling.sample``) on hand-made logits: every field
does what it says, per row, whatever else shares the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelserver.sampling import SamplerState, SamplingParams, sample

V = 50
CPU = torch.device("cpu")


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _state(prompt: list[int] | None = None, choice: int = 0, **kw: object) -> SamplerState:
    params = dataclasses.replace(SamplingParams(max_tokens=8, temperature=0), **kw)
    return SamplerState.create(params, prompt or [1, 2], CPU, choice)


def test_greedy_rows_take_the_argmax() -> None:
    x = _logits(3)
    got = [s.token for s in sample(x, [_state(), _state(), _state()])]
    assert got == torch.argmax(x, dim=-1).tolist()


def test_logit_bias_moves_only_its_row() -> None:
    x = _logits(2)
    low = int(torch.argmin(x[0]))
    got = sample(x, [_state(logit_bias=((low, 100.0),)), _state()])
    assert got[0].token == low
    assert got[1].token == int(torch.argmax(x[1]))


def test_penalties_push_away_from_repeated_tokens() -> None:
    x = torch.zeros(1, V)
    x[0, 7], x[0, 8] = 2.0, 1.5
    seen = _state(prompt=[7], repetition_penalty=2.0)  # 2.0 / 2 < 1.5
    assert sample(x, [seen])[0].token == 8
    for kw in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.0}):
        state = _state(**kw)
        first = sample(x, [state])[0].token  # 7; then penalised below 8
        assert (first, sample(x, [state])[0].token) == (7, 8)
    assert [sample(x, [_state()])[0].token for _ in range(2)] == [7, 7]  # without: the same token again


def test_top_k_1_and_min_p_1_are_greedy_at_any_temperature() -> None:
    x = _logits(4, seed=3)
    want = torch.argmax(x, dim=-1).tolist()
    for kw in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        states = [_state(temperature=2.0, seed=i, **kw) for i in range(4)]
        assert [s.token for s in sample(x, states)] == want


def test_top_k_keeps_sampling_within_the_k_best() -> None:
    x = _logits(1, seed=4)
    best = set(torch.topk(x[0], 3).indices.tolist())
    state = _state(temperature=2.0, top_k=3, seed=1)
    drawn = {sample(x, [state])[0].token for _ in range(60)}
    assert drawn <= best and len(drawn) > 1


def test_a_seed_samples_the_same_tokens_whatever_shares_the_batch() -> None:
    x = _logits(1, seed=5)

    def run(batch_with: int) -> list[int]:
        mine = _state(temperature=1.0, seed=42)
        others = [_state(temperature=1.0, top_p=0.9) for _ in range(batch_with)]
        out = []
        for _ in range(20):
            rows = torch.cat([x] * (batch_with + 1))
            out.append(sample(rows, [*others[: batch_with // 2], mine, *others[batch_with // 2:]])[batch_with // 2].token)
        return out

    alone = run(0)
    assert run(3) == alone == run(6)
    assert len(set(alone)) > 1  # it does sample
    other_seed = _state(temperature=1.0, seed=43)
    assert [sample(x, [other_seed])[0].token for _ in range(20)] != alone


def test_choices_of_a_seeded_request_differ_and_repeat() -> None:
    x = _logits(1, seed=6)

    def draws(choice: int) -> list[int]:
        state = _state(temperature=1.0, seed=7, choice=choice)
        return [sample(x, [state])[0].token for _ in range(20)]

    assert draws(0) == draws(0) and draws(1) == draws(1) and draws(0) != draws(1)


def test_logprobs_are_the_models_own_for_the_chosen_token() -> None:
    x = _logits(3, seed=8)
    states = [_state(logprobs=3), _state(), _state(temperature=1.0, seed=1, logprobs=0, logit_bias=((0, 5.0),))]
    out = sample(x, states)
    lp = torch.log_softmax(x, dim=-1)
    assert out[0].logprob == pytest.approx(float(lp[0].max()))
    assert [t for t, _ in out[0].top] == torch.topk(lp[0], 3).indices.tolist()
    assert out[0].top[0] == (out[0].token, pytest.approx(out[0].logprob))
    assert out[1].logprob is None and out[1].top == []
    assert out[2].logprob == pytest.approx(float(lp[2, out[2].token])) and out[2].top == []
