"""Hypothesis against the model server's token sampler: every temperature and top_p the shared
schema accepts (``0 <= temperature <= 2``, ``0 < top_p <= 1``) picks a token of the vocabulary.

The gateway fuzz suite found the engine stopping for good ("invalid multinomial distribution")
after a request with ``temperature`` 1e-38: its logits overflowed to inf, softmax made NaNs, and
the engine thread's error failed that request and every later one. This suite then found the
same with ``top_p`` 5e-324 (0 in float32: every token was dropped).
"""

from __future__ import annotations

import torch
from fuzzing import fuzz_settings
from hypothesis import example, given
from hypothesis import strategies as st

from modelserver.sampling import SamplerState, SamplingParams, sample

_LOGITS = st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=64)
_TEMPERATURE = st.one_of(st.floats(0, 2), st.sampled_from([5e-324, 1e-45, 1e-40, 1e-38, 1e-30]))
_TOP_P = st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-30, 1.0]))


@fuzz_settings(200)
@given(logits=_LOGITS, temperature=_TEMPERATURE, top_p=_TOP_P, seed=st.integers(0, 2**63 - 1))
@example(logits=[1.0, 3.0, 2.0], temperature=1e-38, top_p=1.0, seed=0)  # was a RuntimeError in multinomial
@example(logits=[1.0, 3.0, 2.0], temperature=1.0, top_p=5e-324, seed=0)  # was the same RuntimeError
@example(logits=[1.0, 3.0, 2.0], temperature=5e-324, top_p=5e-324, seed=0)
def test_every_accepted_temperature_and_top_p_picks_a_token(logits: list[float], temperature: float, top_p: float,
                                                            seed: int) -> None:
    tensor = torch.tensor([logits], dtype=torch.float32)
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, seed=seed)

    def pick() -> int:
        return sample(tensor, [SamplerState.create(params, [], torch.device("cpu"))])[0].token

    token = pick()
    assert 0 <= token < len(logits)
    if 0 < temperature < 1e-38 and max(logits) - min(logits) > 1:  # far below any spread: greedy
        assert logits[token] == max(logits)
    assert pick() == token  # a seed decides
