"""Which Hugging Face checkpoints the built-in model server runs. Pure: reads a config dict.

The node asks ``check_model_config`` when it reads a model directory at deploy (the snapshot
build or the first start), and the model server asks it again when it loads, so an architecture
or a quantisation the runtime does not support is refused with an error naming it, before any
instance starts, never loaded half-way or silently cast.

Supported: the ``model_type`` values of ``SUPPORTED_MODEL_TYPES``, each verified against
transformers' own ``generate`` (tests/inproc/test_modelserver_architectures.py); unquantised or
fp8 (e4m3) weights, from ``quantization_config`` ``quant_method`` "fp8" (per-tensor or block
``weight_scale_inv``) or "compressed-tensors" (8-bit float weights, per-tensor, per-channel or
block ``weight_scale``), dense models only. A multimodal checkpoint of ``TEXT_OF_MULTIMODAL``
(Gemma-3 4B and up) is served as its language model, text only (``text_config``). ``fp8_scheme`` says how such a checkpoint's scales
are laid out, for the loader.

Embedding models (Qwen3-Embedding and the like: a decoder whose last token's final hidden state,
L2-normalised, is the vector) are told apart by their checkpoint, as sentence-transformers and
vLLM tell them: a ``modules.json`` with a ``Pooling`` module (whose ``pooling_mode_lasttoken``
must be set: other poolings are refused by name), or ``architectures`` naming a bare decoder
(``Qwen3Model``) rather than a ``...ForCausalLM``. ``embedding_of`` says which; ``read_embedding``
reads those small files of a model directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapwake.errors import InvalidArgument

__all__ = ["SUPPORTED_MODEL_TYPES", "TEXT_OF_MULTIMODAL", "Embedding", "Fp8Scheme", "check_model_config",
           "embedding_of", "fp8_scheme", "read_embedding", "text_config"]

# model_type -> the family as users know it (for messages).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama", "qwen2": "Qwen2/Qwen2.5", "qwen3": "Qwen3", "mistral": "Mistral",
    "gemma2": "Gemma-2", "gemma3_text": "Gemma-3 (text)", "phi3": "Phi-3",
    "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral",
}
MOE_MODEL_TYPES = frozenset({"qwen2_moe", "qwen3_moe", "mixtral"})
# Multimodal checkpoints whose language model is served (text only): model_type -> its text model's.
TEXT_OF_MULTIMODAL = {"gemma3": "gemma3_text"}


@dataclass(frozen=True)
class Fp8Scheme:
    """How an fp8 checkpoint stores its weight scales."""

    scale_name: str
    """The scale tensor beside each quantised ``weight``: ``weight_scale`` or ``weight_scale_inv``."""
    block: tuple[int, int] | None
    """Block-wise scales ([out / b0, in / b1]); None: per-tensor ([1]) or per-channel ([out, 1])."""
    channel: bool
    """Per-channel scales ([out, 1]) rather than one per tensor."""
    ignore: tuple[str, ...]
    """Linear modules left unquantised: names, name suffixes, or ``re:`` patterns."""

    def quantised(self, module_path: str) -> bool:
        """Whether the Linear at ``module_path`` holds fp8 weights: every Linear but those the
        checkpoint's ignore list names."""
        for rule in self.ignore:
            if rule.startswith("re:"):
                if re.fullmatch(rule[3:], module_path):
                    return False
            elif module_path == rule or module_path.endswith("." + rule):
                return False
        return True


def _refuse(what: str) -> InvalidArgument:
    return InvalidArgument(f"model config: {what}", field="model_dir")


def check_model_config(config: dict[str, Any]) -> None:
    """InvalidArgument naming the architecture or quantisation of ``config`` (a parsed
    config.json) that the built-in model server cannot run; None when it can."""
    kind = config.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise _refuse("config.json has no model_type")
    if kind in TEXT_OF_MULTIMODAL:  # served text only: its language model must be supported
        if not isinstance(config.get("text_config"), dict):
            raise _refuse(f"a {kind} checkpoint needs its text_config")
        return check_model_config(text_config(config))
    if kind not in SUPPORTED_MODEL_TYPES:
        archs = config.get("architectures")
        name = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else kind
        raise _refuse(f"architecture {name} (model_type {kind!r}) is not supported by the built-in model "
                      f"server; supported: {', '.join(sorted([*SUPPORTED_MODEL_TYPES, *TEXT_OF_MULTIMODAL]))}")
    fp8_scheme(config)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the model the server runs: a multimodal checkpoint's language model (its
    ``text_config``, with the top level's dtype and quantisation), else ``config`` itself."""
    kind = config.get("model_type")
    if kind not in TEXT_OF_MULTIMODAL or not isinstance(config.get("text_config"), dict):
        return config
    out = {**config["text_config"], "model_type": TEXT_OF_MULTIMODAL[kind]}
    for key in ("dtype", "torch_dtype", "quantization_config"):
        if key in config:
            out[key] = config[key]
    return out


def fp8_scheme(config: dict[str, Any]) -> Fp8Scheme | None:
    """The fp8 layout of a quantised checkpoint, None for an unquantised one; InvalidArgument
    naming the method for every other quantisation."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise _refuse("quantization_config must be an object")
    method = str(q.get("quant_method") or "")
    if method == "fp8":
        scheme = _hf_fp8(q)
    elif method == "compressed-tensors":
        scheme = _compressed_tensors(q)
    else:
        raise _refuse(f"quantization method {method or '(none)'!r} is not supported by the built-in model "
                      "server (supported: unquantised weights, fp8 and compressed-tensors fp8); it is not "
                      "cast to another format")
    if config.get("model_type") in MOE_MODEL_TYPES:
        raise _refuse(f"fp8 weights of a mixture-of-experts model ({config.get('model_type')}) are not "
                      "supported; deploy its bf16 checkpoint")
    return scheme


def _hf_fp8(q: dict[str, Any]) -> Fp8Scheme:
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(f"fp8 format {fmt!r} is not supported (only e4m3)")
    block = q.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise _refuse(f"fp8 weight_block_size {block!r} must be two positive integers")
    ignore = q.get("modules_to_not_convert") or ["lm_head"]
    return Fp8Scheme("weight_scale_inv", (block[0], block[1]) if block else None, False, _names(ignore))


def _compressed_tensors(q: dict[str, Any]) -> Fp8Scheme:
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _refuse("compressed-tensors: exactly one config group is supported")
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise _refuse("compressed-tensors: the config group has no weights scheme")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if bits != 8 or kind != "float":
        raise _refuse(f"compressed-tensors {bits}-bit {kind} weights are not supported (only 8-bit float, fp8)")
    fmt = q.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise _refuse(f"compressed-tensors format {fmt!r} is not supported (only float-quantized)")
    if weights.get("symmetric") is False:
        raise _refuse("compressed-tensors asymmetric (zero-point) fp8 weights are not supported")
    targets = group.get("targets") or ["Linear"]
    if targets != ["Linear"]:
        raise _refuse(f"compressed-tensors targets {targets!r} are not supported (only Linear)")
    block = None
    if strategy == "block":
        b = weights.get("block_structure")
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
            raise _refuse(f"compressed-tensors block_structure {b!r} must be two positive integers")
        block = (b[0], b[1])
    elif strategy not in ("tensor", "channel"):
        raise _refuse(f"compressed-tensors weight strategy {strategy!r} is not supported "
                      "(tensor, channel or block)")
    return Fp8Scheme("weight_scale", block, strategy == "channel", _names(q.get("ignore") or []))


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _refuse(f"the quantisation ignore list must be a list of names, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Embedding:
    """How an embedding model makes its vectors: the last token's final hidden state."""

    size: int
    """The vector's length (the hidden size)."""
    normalize: bool = True
    """L2-normalised (sentence-transformers' ``Normalize`` module, or a bare decoder's default)."""
    matryoshka: bool = False
    """Trained for shorter vectors: any ``dimensions`` up to ``size`` (cut, then normalised)."""

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "normalize": self.normalize, "matryoshka": self.matryoshka}

    @classmethod
    def from_json(cls, data: Any) -> Embedding | None:
        if not isinstance(data, dict):
            return None
        return cls(int(data["size"]), bool(data.get("normalize", True)), bool(data.get("matryoshka", False)))


_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


def embedding_of(config: dict[str, Any], modules: list[Any] | None = None,
                 pooling: dict[str, Any] | None = None) -> Embedding | None:
    """The embedding a checkpoint makes (None: a generative model). ``modules`` is its
    sentence-transformers ``modules.json``, ``pooling`` its Pooling module's config.json.
    InvalidArgument naming a pooling the model server does not do (only last-token)."""
    cfg = text_config(config)
    size = cfg.get("hidden_size")
    matryoshka = bool(cfg.get("is_matryoshka")) or bool(cfg.get("matryoshka_dimensions"))
    types = [str(m.get("type", "")) for m in modules or () if isinstance(m, dict)]
    if _POOLING_MODULE in types:
        modes = sorted(k.removeprefix("pooling_mode_") for k, v in (pooling or {}).items()
                       if k.startswith("pooling_mode_") and v is True)
        if modes != ["lasttoken"]:
            raise _refuse(f"embedding pooling {'+'.join(modes) or '(none)'} is not supported by the built-in "
                          "model server (only last-token pooling, as Qwen3-Embedding uses)")
        normalize = _NORMALIZE_MODULE in types
    else:
        archs = config.get("architectures")
        bare = isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) \
            and archs[0].endswith("Model") and not archs[0].endswith("PreTrainedModel")
        if not bare:
            return None
        normalize = True
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 20:
        raise _refuse("an embedding model's config needs its hidden_size")
    return Embedding(size, normalize, matryoshka)


def read_embedding(model_dir: Path, config: dict[str, Any]) -> Embedding | None:
    """``embedding_of`` for a model directory (reads ``modules.json`` and its Pooling config)."""
    modules: Any = None
    pooling: Any = None
    path = Path(model_dir) / "modules.json"
    if path.is_file():
        try:
            modules = json.loads(path.read_text())
        except ValueError as exc:
            raise _refuse(f"modules.json is not valid JSON: {exc}") from None
        if not isinstance(modules, list):
            raise _refuse("modules.json must be a list")
        for m in modules:
            sub = m.get("path") if isinstance(m, dict) and m.get("type") == _POOLING_MODULE else None
            if isinstance(sub, str) and ".." not in Path(sub).parts and not sub.startswith("/"):
                pool_path = Path(model_dir) / sub / "config.json"
                try:
                    pooling = json.loads(pool_path.read_text()) if pool_path.is_file() else None
                except ValueError as exc:
                    raise _refuse(f"{sub}/config.json is not valid JSON: {exc}") from None
    return embedding_of(config, modules, pooling if isinstance(pooling, dict) else None)
