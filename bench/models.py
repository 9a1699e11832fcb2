"""Llama-architecture models of real sizes with seeded random weights, for GPU benchmarks.

Nothing is downloaded: the weights are drawn on the GPU from a seeded generator and written as
sharded bf16 safetensors in the Hugging Face layout, with the demo model's tokenizer grown to
the model's vocabulary (``full_vocab_tokenizer``): every id the model can pick decodes to text,
so a client sees its first token when the model produces it (with the demo's 512 tokens, most
ids decoded to nothing and client-side TTFT counted many decode steps).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

__all__ = ["PRESETS", "full_vocab_tokenizer", "make_random_llama"]

TOKENIZER_VERSION = 2  # in config.json: models written with the 512-token tokenizer are rewritten

# Shapes of well-known open models, so the kernels and sizes match what users deploy.
PRESETS: dict[str, dict[str, int]] = {
    # Llama-3.1-8B: 8.0 B parameters, 16.1 GB in bf16.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
    # Mistral-NeMo-12B: 12.2 B parameters, 24.5 GB in bf16.
    "12b": dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=131072),
    # A small one for smoke tests: about 0.5 GB.
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000),
}


def _shapes(c: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def make_random_llama(path: Path, preset: str, seed: int = 0, shard_bytes: int = 4 << 30) -> Path:
    """Writes the model to ``path`` (skipped if its config already matches) and returns it."""
    import torch
    from safetensors.torch import save_file

    from modelserver.demo import make_demo_model

    c = PRESETS[preset]
    path = Path(path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **c,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "bfloat16", "use_cache": True, "snapwake_seed": seed,
              "snapwake_tokenizer": TOKENIZER_VERSION}
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == config:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size = total = 0
    names = _shapes(c)

    def flush() -> None:
        nonlocal shard, size
        fname = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        (path / fname).chmod(0o644)  # save_file writes 0600; containers read as an unprivileged user
        index.update({k: fname for k in shard})
        shard, size = {}, 0

    for name, shape in names:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    del gen
    torch.cuda.empty_cache()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_model(Path(tmp) / "demo")
        for f in ("tokenizer_config.json", "generation_config.json"):
            if (demo / f).exists():
                shutil.copy(demo / f, path / f)
        (path / "tokenizer.json").write_text(full_vocab_tokenizer((demo / "tokenizer.json").read_text(),
                                                                  c["vocab_size"]))
    return path


def full_vocab_tokenizer(tokenizer_json: str, vocab_size: int) -> str:
    """The demo's byte-level BPE tokenizer with tokens added up to ``vocab_size``: id ``i`` past
    the demo's own decodes to `` t{i}``. Encoding is unchanged (no merges lead to them)."""
    tok = json.loads(tokenizer_json)
    vocab: dict[str, int] = tok["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"\u0120t{i}"] = i  # "Ġ" is the byte-level space
    return json.dumps(tok)
