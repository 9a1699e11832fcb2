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
    # Gemma ties its embeddings; with random weights a tied head keeps predicting the last token,
    # so these are untied (Qwen covers tied embeddings).
    "gemma2": dict(tie_word_embeddings=False, sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=5.0,
                   query_pre_attn_scalar=4, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(tie_word_embeddings=False, sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention",
                                                            "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                        query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=WINDOW),  # fused qkv_proj and gate_up_proj
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma3": {},  # Gemma-3 4B and up: the multimodal checkpoint (vision tower too), served text only
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads; on a shared machine they cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(path: Path, kind: str, seed: int = 0) -> Path:
    """A random ``kind`` model at ``path`` in the Hugging Face layout, with the demo tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    make_demo_model(path)
    (path / "model.safetensors").unlink()
    if kind == "gemma3":
        text = CONFIG_MAPPING["gemma3_text"](**_COMMON, **ARCHS["gemma3_text"]).to_dict()
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        config = CONFIG_MAPPING[kind](text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                      image_token_index=500, boi_token_index=501, eoi_token_index=502,
                                      tie_word_embeddings=False)
    else:
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
    # The random model does not say the same for every prompt, nor one token over and over.
    assert len({tuple(w) for w in want}) > 1 and any(len(set(w)) > 2 for w in want)
    assert engine_tokens(path, PROMPTS, MAX_NEW) == want


# --- fp8 checkpoints ------------------------------------------------------------------------

FP8_MAX = 448.0  # the largest float8_e4m3fn value


def _expand(scale: torch.Tensor, block: int, shape: torch.Size) -> torch.Tensor:
    return scale.repeat_interleave(block, 0)[:shape[0]].repeat_interleave(block, 1)[:, :shape[1]]


def make_fp8_model(tmp: Path, kind: str, scheme: str) -> tuple[Path, Path]:
    """A random ``kind`` model quantised to fp8 as published checkpoints are (compressed-tensors
    per-channel ``weight_scale``, or the "fp8" method's 32x32 block ``weight_scale_inv``), and the
    same model dequantised to float32: the reference."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = make_model(tmp / "src", kind)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    quant: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight") and w.dim() == 2):
            quant[name] = deq[name] = w
            continue
        if scheme == "channel":
            scale = w.abs().amax(1, keepdim=True) / FP8_MAX
            full = scale
            quant[name + "_scale"] = scale
        else:
            out, inp = w.shape
            pad = w.new_zeros(-(-out // 32) * 32, -(-inp // 32) * 32)
            pad[:out, :inp] = w.abs()
            scale = pad.view(pad.shape[0] // 32, 32, pad.shape[1] // 32, 32).amax((1, 3)) / FP8_MAX
            full = _expand(scale, 32, w.shape)
            quant[name + "_scale_inv"] = scale
        q = (w / full).to(torch.float8_e4m3fn)
        quant[name] = q
        deq[name] = q.float() * full
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    dirs = []
    for label, weights in (("fp8", quant), ("deq", deq)):
        d = tmp / label
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(src / f, d / f)
        cfg = dict(config)
        if label == "fp8":
            cfg["quantization_config"] = (
                {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                 "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                     "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
                if scheme == "channel" else
                {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]})
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs[0], dirs[1]


@pytest.mark.parametrize(("kind", "scheme"), [("llama", "channel"), ("qwen3", "block")])
def test_fp8_weights_stay_fp8_and_match_the_dequantised_model(tmp_path: Path, kind: str, scheme: str) -> None:
    """The arena keeps the fp8 bytes (one per weight) with their scales; computed in float32,
    greedy output is token for token that of the dequantised float32 checkpoint under
    transformers, and the logits agree within 1e-4 (the stated tolerance: dequantising per layer
    is the same arithmetic, up to the order of float32 sums)."""
    from transformers import AutoModelForCausalLM

    from modelserver.model import bind, build_skeleton, fill_from_safetensors, layout, read_model_config

    fp8_dir, deq_dir = make_fp8_model(tmp_path, kind, scheme)
    sk = build_skeleton(read_model_config(fp8_dir), "float32")
    specs, arena_bytes = layout(sk)
    dtypes = {s.name: s.dtype for s in specs}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "float8_e4m3fn"
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "float8_e4m3fn"
    assert dtypes["model.embed_tokens.weight"] == "float32"
    fp8 = [s for s in specs if s.dtype == "float8_e4m3fn"]
    assert fp8 and all(s.nbytes == s.shape[0] * s.shape[1] for s in fp8)  # one byte a weight in the arena
    arena = torch.zeros(arena_bytes, dtype=torch.uint8)
    fill_from_safetensors(fp8_dir, specs, arena)
    bind(sk, specs, arena)
    ref = AutoModelForCausalLM.from_pretrained(str(deq_dir), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPTS[-1]])
    with torch.inference_mode():
        got, want = sk.model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4
    # A standby rebuilds the skeleton from the manifest alone: the same fp8 layout, the same logits.
    from modelserver import manifest
    from modelserver.model import modelserver_config

    msg = manifest.to_proto(specs, arena_bytes, modelserver_config(read_model_config(fp8_dir), sk.dtype))
    specs2, _, config2 = manifest.from_json(manifest.to_json(msg))
    sk2 = build_skeleton(config2["model_config"], config2["dtype"])
    bind(sk2, specs2, arena)
    with torch.inference_mode():
        assert torch.equal(sk2.model(input_ids=ids).logits, got)
    assert engine_tokens(fp8_dir, PROMPTS, MAX_NEW, dtype="float32") == reference(deq_dir, PROMPTS, MAX_NEW)


def test_windowed_and_soft_capped_attention_in_small_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma-2 with a tiny gather budget: prefill computes its explicit scores a few query rows at
    a time and decode gathers one sequence at a time; the tokens do not change."""
    from modelserver import kvcache

    monkeypatch.setattr(kvcache, "GATHER_BYTES", 4096)
    path = make_model(tmp_path / "gemma2", "gemma2", seed=1)
    assert engine_tokens(path, PROMPTS, MAX_NEW) == reference(path, PROMPTS, MAX_NEW)
