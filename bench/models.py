"""Models of real sizes with seeded random weights, for GPU benchmarks.

Nothing is downloaded: the weights are drawn (on the GPU by default) from a seeded generator and
written as sharded safetensors in the Hugging Face layout, with the demo model's tokenizer grown
to the model's vocabulary (``full_vocab_tokenizer``): every id the model can pick decodes to
text, so a client sees its first token when the model produces it (with the demo's 512 tokens,
most ids decoded to nothing and client-side TTFT counted many decode steps).

Each preset is the shape of a well-known open model: Llama (bf16), Qwen3-4B and Gemma-3-4B's
language model (bf16, tied embeddings, as published), and Llama-3.1-8B with fp8 e4m3 weights and
per-channel scales in the compressed-tensors layout (as published fp8 checkpoints are). The
tensor names and shapes are not written by hand: they are read from transformers' own class for
the architecture, built on the meta device from the config this module writes, so the checkpoint
is exactly what that class (and the built-in model server, which builds the same class) loads.
Token ids 0/1/2 (pad/bos/eos) are the demo tokenizer's, not the original models'.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "TINY", "describe", "full_vocab_tokenizer", "make_random_llama", "make_random_model",
           "model_config"]

TOKENIZER_VERSION = 2  # in config.json: models written with the 512-token tokenizer are rewritten
FP8_MAX = 448.0  # the largest float8_e4m3fn value

_LLAMA: dict[str, Any] = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                              hidden_act="silu", tie_word_embeddings=False)
_LLAMA_8B: dict[str, Any] = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256)

# Shapes of well-known open models, so the kernels and sizes match what users deploy. Keys besides
# the config's: ``model_type`` (default llama), ``fp8`` (weights quantised, per-channel scales),
# ``sliding_window_pattern`` (Gemma-3: every n-th layer attends globally, the rest locally).
PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B: 8.0 B parameters, 16.1 GB in bf16.
    "8b": dict(_LLAMA_8B),
    # Mistral-NeMo-12B: 12.2 B parameters, 24.5 GB in bf16.
    "12b": dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=131072),
    # A small one for smoke tests: about 0.5 GB.
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000),
    # Qwen3-4B (Qwen/Qwen3-4B config.json): 4.0 B parameters, tied embeddings, q/k RMS norms; 8.0 GB.
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, hidden_act="silu", attention_bias=False, max_window_layers=36),
    # Gemma-3-4B's language model (google/gemma-3-4b-it text_config) as Gemma3ForCausalLM: 3.9 B
    # parameters, head_dim 256, q/k norms and pre/post feed-forward norms, 1024-token sliding
    # window on 5 of every 6 layers, linear rope scaling (8x) on the global ones; 7.8 GB.
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                      tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-6,
                      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=1024,
                      sliding_window_pattern=6,
                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Llama-3.1-8B in fp8 (as RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8: compressed-tensors, e4m3
    # weights with per-channel scales, lm_head and embeddings in bf16): 9.1 GB.
    "8b-fp8": dict(_LLAMA_8B, fp8=True),
}

# The same shape families at tiny dims (CPU tests): overrides for ``make_random_model``.
TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=1024, sliding_window=8)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_OWN_KEYS = ("model_type", "fp8", "sliding_window_pattern")

COMPRESSED_TENSORS_FP8_CHANNEL: dict[str, Any] = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                              "symmetric": True, "dynamic": False, "group_size": None}}}}


def model_config(preset: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of ``preset`` (with ``overrides`` of its dims), as transformers' own config
    class for the architecture writes it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    p = {**PRESETS[preset], **(overrides or {})}
    kind = p.get("model_type", "llama")
    args = {k: v for k, v in p.items() if k not in _OWN_KEYS}
    if kind == "llama":
        args = {**_LLAMA, **args}
    if kind != "gemma3_text":
        args.pop("sliding_window", None)
    if "sliding_window_pattern" in p:
        n = p["sliding_window_pattern"]
        args["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                               for i in range(args["num_hidden_layers"])]
    args.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    config: dict[str, Any] = CONFIG_MAPPING[kind](**args).to_dict()
    config.pop("transformers_version", None)
    config.update(architectures=[ARCHITECTURES[kind]], model_type=kind, torch_dtype="bfloat16",
                  snapwake_seed=seed, snapwake_tokenizer=TOKENIZER_VERSION)
    if p.get("fp8"):
        config["quantization_config"] = json.loads(json.dumps(COMPRESSED_TENSORS_FP8_CHANNEL))
    return json.loads(json.dumps(config))  # plain JSON values, comparable with a config read back


def _tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of the checkpoint, from transformers' class for the
    architecture built on the meta device: kind is "fp8" (quantised weight), "scale" (its
    per-channel scale), "norm", "bias" or "weight". Tied weights appear once, as save_pretrained
    writes them."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from snapwake.modelsupport import check_model_config, fp8_scheme

    check_model_config(config)  # what the node would refuse at deploy, refused here
    scheme = fp8_scheme(config)
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(
        {k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tied = model.get_input_embeddings().weight
    fp8 = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied
           and scheme is not None and scheme.quantised(n)}
    if scheme is not None and (scheme.block is not None or not scheme.channel or scheme.scale_name != "weight_scale"):
        raise ValueError(f"only per-channel weight_scale fp8 is generated, not {scheme}")
    out: list[tuple[str, tuple[int, ...], str]] = []
    for name, p in model.named_parameters():  # remove_duplicate: a tied head is not written
        shape = tuple(p.shape)
        if name in fp8:
            out += [(name, shape, "fp8"), (name.removesuffix("weight") + "weight_scale", (shape[0], 1), "scale")]
        elif p.dim() >= 2:
            out.append((name, shape, "weight"))
        else:
            out.append((name, shape, "norm" if "norm" in name else "bias"))
    persistent = [(n, tuple(b.shape)) for mod_name, mod in model.named_modules()
                  for n, b in ((f"{mod_name}.{k}" if mod_name else k, b) for k, b in mod._buffers.items()
                               if b is not None and k not in mod._non_persistent_buffers_set)]
    if persistent:
        raise ValueError(f"persistent buffers are not generated: {persistent}")
    return out


def make_random_model(path: Path, preset: str, seed: int = 0, shard_bytes: int = 4 << 30, device: str = "cuda",
                      overrides: dict[str, Any] | None = None) -> Path:
    """Writes ``preset`` (its dims changed by ``overrides``) to ``path`` (skipped if its config
    already matches) and returns it. Weights are drawn on ``device``."""
    import torch
    from safetensors.torch import save_file

    from modelserver.demo import make_demo_model

    config = model_config(preset, seed, overrides)
    path = Path(path)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == config:
        return path
    tensors = _tensors(config)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Gemma's RMS norms scale by (1 + weight): zeros are its identity, as transformers initialises them.
    norm_value = 0.0 if config["model_type"].startswith("gemma") else 1.0
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size = total = 0
    pending_scale: dict[str, torch.Tensor] = {}

    def flush() -> None:
        nonlocal shard, size
        fname = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        (path / fname).chmod(0o644)  # save_file writes 0600; containers read as an unprivileged user
        index.update({k: fname for k in shard})
        shard, size = {}, 0

    for name, shape, kind in tensors:
        if kind == "norm":
            t = torch.full(shape, norm_value, dtype=torch.bfloat16)
        elif kind == "bias":
            t = torch.zeros(shape, dtype=torch.bfloat16)
        elif kind == "scale":
            t = pending_scale.pop(name)
        else:
            w = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
            if kind == "fp8":  # per output channel: the row's largest magnitude maps to the fp8 maximum
                scale = (w.abs().amax(1, keepdim=True).float() / FP8_MAX).to(torch.bfloat16)
                pending_scale[name.removesuffix("weight") + "weight_scale"] = scale.cpu()
                w = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            t = w.cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    del gen
    if device == "cuda":
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
                                                                  config["vocab_size"]))
    return path


def make_random_llama(path: Path, preset: str, seed: int = 0, shard_bytes: int = 4 << 30) -> Path:
    """``make_random_model`` under its old name (every preset, not only Llama's)."""
    return make_random_model(path, preset, seed, shard_bytes)


def describe(model: Path) -> dict[str, Any]:
    """Architecture and weight dtype of a model directory, for benchmark results."""
    config = json.loads((Path(model) / "config.json").read_text())
    q = config.get("quantization_config")
    dtype = str(config.get("torch_dtype") or config.get("dtype"))
    if q:
        groups: dict[str, Any] = q.get("config_groups") or {}
        first: dict[str, Any] = next(iter(groups.values()), {})
        w: dict[str, Any] = first.get("weights") or {}
        dtype = f"fp8-e4m3 weights ({q['quant_method']}, {w.get('strategy', 'block')} scales), {dtype} elsewhere"
    return {"architecture": (config.get("architectures") or ["?"])[0], "model_type": config.get("model_type"),
            "dtype": dtype, "tie_word_embeddings": bool(config.get("tie_word_embeddings"))}


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
