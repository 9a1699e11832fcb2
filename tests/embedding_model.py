"""A small seeded random embedding model, shaped as Qwen3-Embedding is published: the bare Qwen3
decoder's weights, ``architectures`` Qwen3ForCausalLM, and sentence-transformers' modules (last-token
Pooling, then Normalize) that say it embeds; the demo model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modelserver.demo import make_demo_model

__all__ = ["make_embedding_model"]


def make_embedding_model(path: Path, seed: int = 0) -> Path:
    from transformers import AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    make_demo_model(path)
    (path / "model.safetensors").unlink()
    qwen3: Any = CONFIG_MAPPING["qwen3"]
    config = qwen3(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(path), max_shard_size="100KB")
    config_json = json.loads((path / "config.json").read_text())
    config_json["architectures"] = ["Qwen3ForCausalLM"]  # as Qwen3-Embedding publishes it: modules.json decides
    (path / "config.json").write_text(json.dumps(config_json))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
         "pooling_mode_lasttoken": True}))
    for f in path.rglob("*"):  # containers run as another user (safetensors writes its shards 0600)
        f.chmod(0o755 if f.is_dir() else 0o644)
    return path
