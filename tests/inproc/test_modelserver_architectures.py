"""Every architecture the model server supports, on the CPU: a small seeded random model of each
(configs and weights made with transformers' own classes, saved as sharded safetensors with an
index), loaded through the model server's own path (skeleton, arena, checkpoint fill, bind) and
decoded greedily by the real engine, several prompts of different lengths in one batch, one of
them longer than any sliding window, must give token for token what transformers' ``generate``
gives for each prompt alone."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from modelserver.arena import MemfdArena
from modelserver.demo import make_demo_model
from modelserver.instance import Instance, Settings
from modelserver.sampling import SamplingParams

VOCAB = 512  # the demo tokenizer's
WINDOW = 16  # sliding windows, so that the long prompt (and the decode after it) runs past them
MAX_NEW = 10
# Lengths 3 .. 41: one within a block, several past the window and past a block boundary.
PROMPTS = [[1 + (7 * i + 3 * j) % (VOCAB - 1) for j in range(n)] for i, n in enumerate((3, 11, 23, 41))]

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=500000.0),
    "qwen2": dict(tie_word_embeddings=True),  # Qwen2.5 small sizes tie embeddings; q/k/v have biases
    "qwen3": dict(tie_word_embeddings=True),  # q/k norm
    "mistral": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention",
                                                            "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                        query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=WINDOW),  # fused qkv_proj and gate_up_proj
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def make_model(path: Path, kind: str, seed: int = 0) -> Path:
    """A random ``kind`` model at ``path`` in the Hugging Face layout, with the demo tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    make_demo_model(path)
    (path / "model.safetensors").unlink()
    config = CONFIG_MAPPING[kind](**_COMMON, **ARCHS[kind])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # larger than the usual init, so that greedy output varies
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(path), max_shard_size="100KB")
    return path


def reference(path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def engine_tokens(path: Path, prompts: list[list[int]], max_new: int, dtype: str | None = None) -> list[list[int]]:
    """The tokens the model server's engine generates for ``prompts``, all in one batch."""
    from modelserver.__main__ import load_tokenizer

    inst = Instance(Settings(path, dtype=dtype), MemfdArena(), load_tokenizer(path))
    inst.load_from_dir()
    assert inst.engine is not None
    inst.engine.eos_ids = set()  # every request runs to max_new: lengths are known
    try:
        params = SamplingParams(max_tokens=max_new, temperature=0)
        seqs = [inst.engine.submit(p, params, threading.Event(), lambda piece: None) for p in prompts]
        for s in seqs:
            assert s.done.wait(60)
            assert s.error is None, s.error
        assert inst.engine.stats["batch_peak"] > 1
        return [s.out for s in seqs]
    finally:
        inst.release()


@pytest.mark.parametrize("kind", list(ARCHS))
def test_batched_greedy_matches_transformers(tmp_path: Path, kind: str) -> None:
    path = make_model(tmp_path / kind, kind)
    assert (path / "model.safetensors.index.json").exists()  # sharded, as users have them
    want = reference(path, PROMPTS, MAX_NEW)
    assert len({tuple(w) for w in want}) > 1  # the random model does not say the same for every prompt
    assert engine_tokens(path, PROMPTS, MAX_NEW) == want
