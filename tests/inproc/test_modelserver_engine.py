"""The batching engine on the real tiny model (CPU): batched greedy decoding gives exactly what
transformers' own ``generate`` gives one request at a time; preemption, cancel, close and a
request the pool can never hold all end cleanly, with every KV block back in the pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from modelserver.__main__ import load_tokenizer
from modelserver.engine import Engine, Piece
from modelserver.graphs import DecodeGraphs
from modelserver.kvcache import KVPool
from modelserver.sampling import SamplingParams
from snapwake.errors import ResourceExhausted, Unavailable

EOS: set[int] = set()  # no EOS: every request runs to max_tokens, so lengths are known


def _model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _engine(model_dir: Path, blocks: int, max_batch: int = 64) -> Engine:
    model = _model(model_dir)
    cfg = model.config
    pool = KVPool(cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    return Engine(model, load_tokenizer(model_dir), EOS, pool, min(pool.tokens, 512), max_batch=max_batch)


@pytest.fixture
def engine(demo_model_dir: Path) -> Iterator[Engine]:
    eng = _engine(demo_model_dir, blocks=64)
    yield eng
    eng.close(10)


def _reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    ref = _model(model_dir)
    out = []
    with torch.inference_mode():
        for p in prompts:
            g = ref.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def _run_all(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[Piece]]:
    got: list[list[Piece]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            eng.generate(prompts[i], params, threading.Event(), got[i].append)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return got


def _assert_same_text(eng: Engine, got: list[list[Piece]], want: list[list[int]]) -> None:
    for pieces, tokens in zip(got, want, strict=True):
        assert "".join(p.text for p in pieces) == eng.tokenizer.decode(tokens, skip_special_tokens=True)


def _prompts(n: int) -> list[list[int]]:
    return [[1, 5 + i, 40, 77] + list(range(100, 100 + 5 * i)) for i in range(n)]


def test_batched_greedy_matches_transformers_generate(demo_model_dir: Path, engine: Engine) -> None:
    prompts = _prompts(8)
    want = _reference(demo_model_dir, prompts, 20)
    got = _run_all(engine, prompts, SamplingParams(max_tokens=20, temperature=0))
    _assert_same_text(engine, got, want)
    assert all(p[-1].finish_reason == "length" and p[-1].completion_tokens == 20 for p in got)
    assert engine.stats["batch_peak"] > 1  # the requests really were decoded together
    assert engine.pool.allocator.free == engine.pool.allocator.num_blocks


def test_decode_gathers_in_row_chunks_without_changing_the_text(demo_model_dir: Path, engine: Engine,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 1-byte gather budget every sequence is gathered alone: same tokens as one gather."""
    from modelserver import kvcache

    monkeypatch.setattr(kvcache, "GATHER_BYTES", 1)
    prompts = _prompts(5)
    want = _reference(demo_model_dir, prompts, 12)
    got = _run_all(engine, prompts, SamplingParams(max_tokens=12, temperature=0))
    _assert_same_text(engine, got, want)


def test_the_pool_grows_under_load_and_the_text_does_not_change(demo_model_dir: Path) -> None:
    """A pool that starts at 2 blocks (budget 64) grows as 8 requests come in."""
    model = _model(demo_model_dir)
    cfg = model.config
    pool = KVPool(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu",
                  initial_blocks=2)
    eng = Engine(model, load_tokenizer(demo_model_dir), EOS, pool, 512)
    try:
        prompts = _prompts(8)
        want = _reference(demo_model_dir, prompts, 20)
        got = _run_all(eng, prompts, SamplingParams(max_tokens=20, temperature=0))
        _assert_same_text(eng, got, want)
        assert 2 < pool.allocator.num_blocks <= 64 and pool.allocator.free == pool.allocator.num_blocks
        assert eng.max_context == 512  # the context follows the budget, not the current size
    finally:
        eng.close(10)


class _EagerReplay(DecodeGraphs):
    """The decode-graph unit on the CPU: 'capture' builds the static step, 'replay' runs it
    eagerly. Checks the packed inputs, the pad rows and the scratch block without a GPU."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True

    def _capture(self, b: int, w: int) -> Any:
        packed, step = self._static_step(b, w)
        logits = step()
        return SimpleNamespace(graph=SimpleNamespace(replay=lambda: logits.copy_(step())), packed=packed,
                               logits=logits)


def test_decode_through_the_graph_path_keeps_the_text_as_the_pool_grows(demo_model_dir: Path) -> None:
    model = _model(demo_model_dir)
    cfg = model.config
    pool = KVPool(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu",
                  initial_blocks=2)
    eng = Engine(model, load_tokenizer(demo_model_dir), EOS, pool, 512, cuda_graphs=False)
    eng.graphs = _EagerReplay(model, pool, torch.device("cpu"), cuda_graphs=True)  # before any request
    try:
        prompts = _prompts(6)
        want = _reference(demo_model_dir, prompts, 24)
        for _ in range(2):  # the second round replays steps captured after the pool grew
            _assert_same_text(eng, _run_all(eng, prompts, SamplingParams(max_tokens=24, temperature=0)), want)
        assert pool.allocator.num_blocks > 2 and eng.stats["graphs"] > 0 and eng.stats["graph_steps"] > 0
        assert pool.allocator.free == pool.allocator.num_blocks - 1  # all back but the scratch block
    finally:
        eng.close(10)


def test_a_full_pool_preempts_and_recomputes_without_changing_the_text(demo_model_dir: Path) -> None:
    """8 blocks (128 tokens) for 4 requests that grow to ~50 tokens each: some must be preempted."""
    eng = _engine(demo_model_dir, blocks=8)
    try:
        prompts = _prompts(4)
        want = _reference(demo_model_dir, prompts, 32)
        got = _run_all(eng, prompts, SamplingParams(max_tokens=32, temperature=0))
        _assert_same_text(eng, got, want)
        assert eng.stats["preempted"] > 0
        assert eng.pool.allocator.free == 8
    finally:
        eng.close(10)


def test_cancel_stops_a_request_and_frees_its_blocks(engine: Engine) -> None:
    cancel = threading.Event()
    pieces: list[Piece] = []

    def emit(p: Piece) -> None:
        pieces.append(p)
        if len(pieces) == 3:
            cancel.set()

    engine.generate([1, 2, 3], SamplingParams(max_tokens=400, temperature=0), cancel, emit)
    assert pieces[-1].finish_reason == "cancelled" and pieces[-1].completion_tokens < 400
    assert engine.pool.allocator.free == engine.pool.allocator.num_blocks


def test_seeded_sampling_repeats_and_other_seeds_differ(engine: Engine) -> None:
    def text(seed: int) -> str:
        out: list[str] = []
        engine.generate([1, 2, 3], SamplingParams(max_tokens=24, temperature=1.0, seed=seed), threading.Event(),
                        lambda p: out.append(p.text))
        return "".join(out)

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_n_choices_share_one_prefill_and_decode_as_one_request_would(demo_model_dir: Path, engine: Engine,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy choices of one request, prefilled once and their K/V copied, give exactly what the
    request alone gives (a wrong copy would change the text); each choice names its index and
    carries a logprob entry for each of its tokens."""
    prompts = _prompts(3)
    want = _reference(demo_model_dir, prompts[2:], 12)[0]
    got: list[Piece] = []
    params = SamplingParams(max_tokens=12, temperature=0, n=3, logprobs=2)
    forward = engine.model.forward
    widths: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    engine.generate(prompts[2], params, threading.Event(), got.append)
    by_choice = {i: [p for p in got if p.index == i] for i in range(3)}
    for pieces in by_choice.values():
        _assert_same_text(engine, [pieces], [want])
        assert [e.token for p in pieces for e in p.logprobs] == want
        assert all(e.top[0][0] == e.token for p in pieces for e in p.logprobs)
    assert widths[0] == len(prompts[2])  # one prefill for the three choices
    assert widths[1:] == [3] * 11  # then they decode together
    assert engine.pool.allocator.free == engine.pool.allocator.num_blocks


def test_stop_token_ids_end_the_choice(engine: Engine) -> None:
    out: list[Piece] = []
    engine.generate([1, 2, 3], SamplingParams(max_tokens=12, temperature=0), threading.Event(), out.append)
    tokens = engine.tokenizer("".join(p.text for p in out), add_special_tokens=False)["input_ids"]
    cut: list[Piece] = []
    engine.generate([1, 2, 3], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=frozenset({tokens[2]})),
                    threading.Event(), cut.append)
    assert cut[-1].finish_reason == "stop" and cut[-1].completion_tokens < 12


def test_a_request_the_pool_can_never_hold_fails_clearly(demo_model_dir: Path) -> None:
    eng = _engine(demo_model_dir, blocks=2)  # 32 tokens
    try:
        with pytest.raises(ResourceExhausted, match="the pool has 2"):
            eng.generate(list(range(1, 41)), SamplingParams(max_tokens=1, temperature=0), threading.Event(),
                         lambda p: None)
        out: list[Piece] = []  # and the engine goes on serving what fits
        eng.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), threading.Event(), out.append)
        assert out[-1].completion_tokens == 4
    finally:
        eng.close(10)


def test_close_lets_running_requests_finish_then_refuses_new_ones(demo_model_dir: Path) -> None:
    eng = _engine(demo_model_dir, blocks=64)
    got: list[Piece] = []
    seq = eng.submit([1, 2, 3], SamplingParams(max_tokens=64, temperature=0), threading.Event(), got.append)
    eng.close(30)
    assert seq.done.is_set() and seq.error is None
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 64
    with pytest.raises(Unavailable, match="being released"):
        eng.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), threading.Event(), got.append)


def _cuda_engine(model_dir: Path, initial_blocks: int | None = None) -> Engine:
    model = _model(model_dir).to("cuda")
    cfg = model.config
    pool = KVPool(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cuda",
                  initial_blocks=initial_blocks)
    return Engine(model, load_tokenizer(model_dir), EOS, pool, 512)


def _cuda_reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    ref = _model(model_dir).to("cuda")
    with torch.inference_mode():
        return [ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.gpu
def test_batched_greedy_on_cuda_with_graphs_matches_transformers_generate(demo_model_dir: Path) -> None:
    eng = _cuda_engine(demo_model_dir)
    try:
        prompts = _prompts(8)
        want = _cuda_reference(demo_model_dir, prompts, 20)
        _assert_same_text(eng, _run_all(eng, prompts, SamplingParams(max_tokens=20, temperature=0)), want)
        assert eng.stats["batch_peak"] > 1
        assert eng.stats["graphs"] > 0 and eng.stats["graph_steps"] > 0  # decode steps replayed graphs
    finally:
        eng.close(10)


@pytest.mark.gpu
def test_pool_growth_on_cuda_recaptures_graphs_and_keeps_the_text(demo_model_dir: Path) -> None:
    eng = _cuda_engine(demo_model_dir, initial_blocks=2)
    try:
        prompts = _prompts(8)
        want = _cuda_reference(demo_model_dir, prompts, 40)
        for _ in range(2):  # the second round replays graphs captured after the pool grew
            _assert_same_text(eng, _run_all(eng, prompts, SamplingParams(max_tokens=40, temperature=0)), want)
        assert eng.pool.allocator.num_blocks > 2 and eng.stats["graph_steps"] > 0
    finally:
        eng.close(10)
