"""The benchmark presets' shape families (bench/models.py) at tiny dims, on the CPU, through the
same generator the GPU benchmarks use: transformers' class for the architecture loads the
checkpoint with no missing or unexpected tensor, the node accepts its config (fp8 included), and
the built-in model server loads it into its arena and generates. A naming or shape mismatch
fails here, not on the GPU machine."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.models import PRESETS, TINY, describe, make_random_model, model_config
from modelserver.arena import MemfdArena
from modelserver.instance import Instance, Settings
from modelserver.sampling import SamplingParams
from snapwake.modelsupport import check_model_config, fp8_scheme


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _checkpoint_names(path: Path) -> set[str]:
    return set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("preset", ["qwen3-4b", "gemma3-4b", "8b-fp8", "8b"])
def test_tiny_preset_loads_and_generates(tmp_path: Path, preset: str) -> None:
    from safetensors import safe_open

    from modelserver.__main__ import load_tokenizer
    from modelserver.model import build_skeleton, read_model_config

    path = make_random_model(tmp_path / preset, preset, device="cpu", overrides=TINY, shard_bytes=200_000)
    config = read_model_config(path)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert make_random_model(path, preset, device="cpu", overrides=TINY) == path  # the config matches: kept
    assert (path / "config.json").stat().st_mtime_ns == stamp
    check_model_config(config)  # the node would deploy it
    full = model_config(preset)  # the real-size preset: the same family, accepted too
    check_model_config(full)
    assert full["architectures"] == config["architectures"] and full["model_type"] == config["model_type"]
    assert full["num_hidden_layers"] == PRESETS[preset]["num_hidden_layers"]
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    names = _checkpoint_names(path)
    sk = build_skeleton(config)
    # Exactly the tensors the model server's skeleton binds: none missing, none extra.
    assert names == {name for name, _, _ in sk.entries}
    info = describe(path)
    if preset == "8b-fp8":
        scheme = fp8_scheme(config)
        assert scheme is not None and scheme.channel and scheme.scale_name == "weight_scale"
        f = next(iter({v for v in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()}))
        with safe_open(str(path / f), framework="pt") as st:
            dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}
        assert any(d == "F8_E4M3" for d in dtypes.values())
        assert all(k.endswith("proj.weight") for k, d in dtypes.items() if d == "F8_E4M3")
        assert "model.layers.0.mlp.down_proj.weight_scale" in names and "lm_head.weight" in names
        assert info["dtype"].startswith("fp8-e4m3")
    else:
        assert fp8_scheme(config) is None and info["dtype"] == "bfloat16"
        from transformers import AutoModelForCausalLM

        loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
        loading = loaded[1]
        assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    if preset in ("qwen3-4b", "gemma3-4b"):
        assert config["tie_word_embeddings"] and "lm_head.weight" not in names  # tied, as published
    if preset == "gemma3-4b":
        assert config["layer_types"].count("full_attention") == 1 and config["sliding_window"] == TINY["sliding_window"]
        assert "model.layers.0.post_feedforward_layernorm.weight" in names
    if preset == "qwen3-4b":
        assert "model.layers.0.self_attn.q_norm.weight" in names

    inst = Instance(Settings(path), MemfdArena(), load_tokenizer(path))
    inst.load_from_dir()
    assert inst.engine is not None
    inst.engine.eos_ids = set()
    try:
        params = SamplingParams(max_tokens=6, temperature=0)
        prompts = [[1, 5, 9, 200, 300], [1] + list(range(3, 23))]  # the second runs past the sliding window
        seqs = [inst.engine.submit(p, params, threading.Event(), lambda piece: None) for p in prompts]
        for s in seqs:
            assert s.done.wait(60)
            assert s.error is None, s.error
            assert len(s.out) == 6 and all(0 <= t < TINY["vocab_size"] for t in s.out)
    finally:
        inst.release()
