"""A tiny, seeded Llama-architecture model in the Hugging Face layout, made locally.

Tests, the dev launcher and benchmarks need a real model directory without downloading
anything. ``make_demo_model(path, seed)`` writes the same bytes for the same seed every time:
``config.json`` (LlamaForCausalLM, hidden 64, 2 layers, 4 heads, 2 kv heads), a float32
``model.safetensors`` (about 0.6 MB), a byte-level BPE ``tokenizer.json`` trained in-process on a
built-in text, ``tokenizer_config.json`` with a chat template, and ``generation_config.json``.

    python -m modelserver.demo PATH [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_demo_model"]

# Ids 0..N-1 in this order; the model's bos/eos/pad ids follow from it.
SPECIAL_TOKENS = ("<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A model that is not being used costs no GPU at all.
When a request arrives for a model that is not running, the platform brings the model back onto a
GPU from a snapshot in well under a second. Hello, world! How are you today? I am fine, thank you.
One two three four five six seven eight nine ten. The weights live in one contiguous arena, and
the model server maps that arena at a reserved address so that every pointer stays valid. Tokens are
sampled one at a time; the cache keeps the keys and values of every earlier position.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / + = *
"""


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
        "torch_dtype": "float32", "use_cache": True,
    }


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    return tok.to_str(pretty=True)


def _weights(config: dict, seed: int) -> bytes:
    import torch
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
                                          "lm_head.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    tensors = {}
    for name in sorted(shapes):  # sorted: the generator's draw order must not depend on dict order
        shape = shapes[name]
        if len(shape) == 1:
            tensors[name] = torch.ones(shape)
        else:
            # Larger than the usual 0.02 so that greedy output of the random model varies.
            tensors[name] = torch.randn(shape, generator=gen) * (1.0 / shape[1] ** 0.5)
    return save(tensors, metadata={"format": "pt"})


def _files(seed: int) -> dict[str, bytes]:
    config = _config()
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS],
        "eos_token": SPECIAL_TOKENS[EOS], "pad_token": SPECIAL_TOKENS[PAD],
        "add_bos_token": False, "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    gen_config = {"bos_token_id": BOS, "eos_token_id": [EOS], "pad_token_id": PAD, "do_sample": False}

    def dump(obj: dict) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()

    return {"config.json": dump(config), "tokenizer.json": _tokenizer_json().encode(),
            "tokenizer_config.json": dump(tok_config), "generation_config.json": dump(gen_config),
            "model.safetensors": _weights(config, seed)}


def make_demo_model(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Writes (or leaves in place, when already identical) the demo model at ``path``."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in _files(seed).items():
        target = root / name
        if target.is_file() and target.read_bytes() == data:
            continue
        # Write then rename, so a concurrent reader never sees half a file.
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelserver.demo", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_demo_model(args.path, args.seed))


if __name__ == "__main__":
    main()
