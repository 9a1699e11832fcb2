"""Which checkpoints the built-in model server accepts, and how a refusal reads: by architecture
and by quantisation method, at the node (deploy) and in the loader; never a silent cast. Also the
``generation_config.json`` defaults the loader exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from modelserver.manifest import plan
from modelserver.model import fill_from_safetensors, generation_defaults
from services.nodeagent.modelinfo import read_model_metadata
from snapwake.errors import InvalidArgument
from snapwake.modelsupport import (
    SUPPORTED_MODEL_TYPES,
    Embedding,
    check_model_config,
    embedding_of,
    fp8_scheme,
    text_config,
)

CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*gate$"],
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                      "strategy": "tensor", "symmetric": True}}}}


@pytest.mark.parametrize("kind", sorted(SUPPORTED_MODEL_TYPES))
def test_supported_architectures_pass(kind: str) -> None:
    check_model_config({"model_type": kind})


def test_a_multimodal_gemma3_is_served_as_its_language_model() -> None:
    config = {"model_type": "gemma3", "torch_dtype": "bfloat16", "text_config": {"hidden_size": 8}}
    check_model_config(config)
    assert text_config(config) == {"model_type": "gemma3_text", "hidden_size": 8, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize(("config", "named"), [
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "MambaForCausalLM"),
    ({"model_type": "deepseek_v3"}, "'deepseek_v3'"),
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "needs its text_config"),
    ({}, "no model_type"),
])
def test_unsupported_architectures_are_refused_by_name(config: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        check_model_config(config)


@pytest.mark.parametrize(("quant", "named"), [
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "awq"}, "'awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    ({**CT_FP8, "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     "4-bit int"),
    ({**CT_FP8, "format": "pack-quantized"}, "pack-quantized"),
    ({**CT_FP8, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "token"}}}},
     "'token'"),
])
def test_unsupported_quantisation_is_refused_naming_the_method(quant: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        check_model_config({"model_type": "llama", "quantization_config": quant})


def test_fp8_mixture_of_experts_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="mixture-of-experts"):
        check_model_config({"model_type": "qwen3_moe", "quantization_config": CT_FP8})


def test_fp8_schemes() -> None:
    ct = fp8_scheme({"model_type": "llama", "quantization_config": CT_FP8})
    assert ct is not None and ct.scale_name == "weight_scale" and ct.block is None and not ct.channel
    assert ct.quantised("model.layers.0.self_attn.q_proj")
    assert not ct.quantised("lm_head") and not ct.quantised("model.layers.3.mlp.gate")
    hf = fp8_scheme({"model_type": "qwen3", "quantization_config": {"quant_method": "fp8",
                                                                     "weight_block_size": [128, 128]}})
    assert hf is not None and hf.scale_name == "weight_scale_inv" and hf.block == (128, 128)
    assert not hf.quantised("lm_head")
    assert fp8_scheme({"model_type": "llama"}) is None


def test_the_node_refuses_an_unsupported_model_at_deploy(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(InvalidArgument, match="'awq'"):
        read_model_metadata(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}))
    with pytest.raises(InvalidArgument, match="RwkvForCausalLM"):
        read_model_metadata(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 7}))
    meta = read_model_metadata(tmp_path)
    assert meta is not None and meta.vocab_size == 7


@pytest.mark.parametrize(("src", "dst"), [(torch.float8_e4m3fn, "bfloat16"), (torch.bfloat16, "float8_e4m3fn")])
def test_fp8_is_never_cast_without_its_scales(tmp_path: Path, src: torch.dtype, dst: str) -> None:
    """An fp8 checkpoint whose config declares no quantisation (or the reverse) is refused."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4).to(src)}, str(tmp_path / "model.safetensors"))
    specs, size = plan([("w", dst, (4, 4))])
    with pytest.raises(InvalidArgument, match="w: checkpoint dtype"):
        fill_from_safetensors(tmp_path, specs, torch.zeros(size, dtype=torch.uint8))


def test_generation_defaults(tmp_path: Path) -> None:
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0,
        "repetition_penalty": 1.05, "max_new_tokens": 2048, "eos_token_id": [1, 2]}))
    want = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05,
            "max_tokens": 2048}
    assert generation_defaults(tmp_path) == want
    from modelserver.arena import MemfdArena
    from modelserver.instance import Instance, Settings

    assert Instance(Settings(tmp_path), MemfdArena(), None).generation_defaults == want  # what requests read
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": "hot", "top_p": 7, "top_k": True, "max_new_tokens": -1}))
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("[not json")
    assert generation_defaults(tmp_path) == {}


_ST = "sentence_transformers.models."


@pytest.mark.parametrize(("config", "modules", "pooling", "want"), [
    ({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 8}, None, None, None),  # a chat model
    ({"architectures": ["Qwen3Model"], "hidden_size": 8}, None, None, Embedding(8)),  # a bare decoder
    ({"architectures": ["Qwen3PreTrainedModel"], "hidden_size": 8}, None, None, None),
    ({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 8, "matryoshka_dimensions": [4, 8]},
     [{"type": _ST + "Pooling", "path": "p"}, {"type": _ST + "Normalize"}], {"pooling_mode_lasttoken": True},
     Embedding(8, True, True)),
    ({"architectures": ["X"], "hidden_size": 8}, [{"type": _ST + "Pooling", "path": "p"}],
     {"pooling_mode_lasttoken": True, "pooling_mode_cls_token": False}, Embedding(8, False)),  # no Normalize
])
def test_embedding_models_are_told_apart(config: dict[str, Any], modules: Any, pooling: Any, want: Any) -> None:
    assert embedding_of(config, modules, pooling) == want


@pytest.mark.parametrize(("pooling", "named"), [
    ({"pooling_mode_mean_tokens": True}, "mean_tokens"), ({"pooling_mode_cls_token": True}, "cls_token"),
    ({}, "(none)"), ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": True}, "lasttoken+mean_tokens"),
])
def test_other_poolings_are_refused_by_name(pooling: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(f"pooling {named} is not supported")):
        embedding_of({"hidden_size": 8}, [{"type": _ST + "Pooling", "path": "p"}], pooling)
