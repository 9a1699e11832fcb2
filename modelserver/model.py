"""A Hugging Face model directory -> a skeleton on the meta device -> weights as arena views.

Every parameter and persistent buffer lives in the arena at the offset the layout gives it;
parameters are bound as views into the arena tensor. Non-persistent buffers (rotary
``inv_freq``) are computed on the CPU when the skeleton is built and copied to the device at
bind time: they are tiny, derived from the config, and never part of a snapshot. Tied weights
(``lm_head`` sharing the embedding) are one arena tensor bound under every alias.

Architectures are transformers' own modelling code (``snapwake.modelsupport`` lists those that
are verified, and refuses the rest by name); what differs per architecture is data: the module
tree the config builds, and how a checkpoint names its tensors. A mixture-of-experts model keeps
its experts as 3-D tensors (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I])
while checkpoints store one matrix per expert; ``_sources`` says which checkpoint tensors fill
which slice of such an arena tensor. fp8 checkpoints keep their fp8 weights and scales in the
arena (``modelserver.fp8``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelserver.fp8 import quantise_skeleton
from modelserver.manifest import TensorSpec, plan
from snapwake.errors import InvalidArgument, NotFound
from snapwake.modelsupport import Embedding, check_model_config, fp8_scheme, text_config

__all__ = ["Skeleton", "bind", "build_skeleton", "fill_from_safetensors", "generation_defaults",
           "read_model_config", "modelserver_config", "unbind"]


@dataclass
class Skeleton:
    """The model with no weights, and what binding needs to know about it."""

    model: nn.Module
    config: Any
    dtype: torch.dtype
    entries: list[tuple[str, str, tuple[int, ...]]]
    """Arena tensors (name, dtype, shape) in model order; one per distinct tensor."""
    aliases: dict[str, list[str]] = field(default_factory=dict)
    """Arena tensor name -> every module path it is bound under (tied weights have several)."""
    cpu_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Non-persistent buffers, computed on the CPU, copied to the device at bind."""
    embedding: Embedding | None = None
    """Set for an embedding model: the bare decoder (no LM head), pooled by ``modelserver.embedding``."""


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model directory."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NotFound(f"{path} does not exist", field="model_dir") from exc
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}", field="model_dir") from exc


def modelserver_config(model_config: dict[str, Any], dtype: torch.dtype,
                       embedding: Embedding | None = None) -> dict[str, Any]:
    """What goes into the manifest's ``modelserver_config_json``: enough to rebuild the skeleton."""
    out: dict[str, Any] = {"model_config": model_config, "dtype": str(dtype).removeprefix("torch.")}
    if embedding is not None:
        out["embedding"] = embedding.to_json()
    return out


def _dtype(model_config: dict[str, Any], override: str | None) -> torch.dtype:
    name = override or model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"unknown dtype {name!r}", field="dtype")
    return dtype


def build_skeleton(model_config: dict[str, Any], dtype: str | None = None,
                   embedding: Embedding | None = None) -> Skeleton:
    """Builds the model on the meta device (no weight memory) from a config dict; for an
    ``embedding`` model, the bare decoder (no LM head)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_model_config(model_config)
    model_config = text_config(model_config)  # a multimodal checkpoint: its language model
    kind = str(model_config["model_type"])
    scheme = fp8_scheme(model_config)
    # transformers' own quantisers are not used: the fp8 modules are swapped in below.
    config = CONFIG_MAPPING[kind].from_dict({k: v for k, v in model_config.items() if k != "quantization_config"})
    torch_dtype = _dtype(model_config, dtype)
    if scheme is not None and torch_dtype.itemsize < 2:
        raise InvalidArgument(f"dtype {torch_dtype} cannot compute an fp8 model; use bfloat16", field="dtype")
    with torch.device("meta"):
        model = (AutoModel if embedding is not None else AutoModelForCausalLM).from_config(config, dtype=torch_dtype)
    if scheme is not None:
        quantise_skeleton(model, scheme)
    model.eval().requires_grad_(False)
    sk = Skeleton(model, config, torch_dtype, [], embedding=embedding)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            sk.aliases[seen[id(p)]].append(name)
            continue
        seen[id(p)] = name
        sk.aliases[name] = [name]
        sk.entries.append((name, str(p.dtype).removeprefix("torch."), tuple(p.shape)))
    _rebuild_buffers(sk)
    return sk


def _rebuild_buffers(sk: Skeleton) -> None:
    """Persistent buffers join the arena; non-persistent ones are recomputed on the CPU by
    re-creating their (small, config-driven) module there."""
    for mod_name, mod in sk.model.named_modules():
        for buf_name, buf in list(mod._buffers.items()):
            full = f"{mod_name}.{buf_name}" if mod_name else buf_name
            if buf is None:
                continue
            if buf_name not in mod._non_persistent_buffers_set:
                sk.aliases[full] = [full]
                sk.entries.append((full, str(buf.dtype).removeprefix("torch."), tuple(buf.shape)))
                continue
            if hasattr(mod, "scalar_embed_scale"):  # Gemma's scaled embeddings: a scalar
                sk.cpu_buffers[full] = torch.tensor(mod.scalar_embed_scale)
                continue
            if not hasattr(mod, "config"):
                raise InvalidArgument(f"cannot rebuild buffer {full}: its module has no config",
                                      field="architectures")
            with torch.device("cpu"):
                fresh = type(mod)(mod.config)
            sk.cpu_buffers[full] = fresh._buffers[buf_name]


def layout(sk: Skeleton) -> tuple[list[TensorSpec], int]:
    """The arena layout of a skeleton."""
    return plan(sk.entries)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise NotFound(f"no *.safetensors in {model_dir}", field="model_dir")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


_EXPERT = re.compile(r"(?P<pre>.*)\.mlp\.experts\.(?P<what>gate_up_proj|down_proj)")


def _sources(name: str, shape: tuple[int, ...], where: dict[str, Path]) -> list[tuple[str, Any]] | None:
    """The checkpoint tensors that fill arena tensor ``name``, each with the index of the slice it
    fills (``...`` for all of it); None when the checkpoint has none of them."""
    # A multimodal checkpoint keeps its language model under a prefix (both layouts exist).
    rest = name.removeprefix("model.")
    # A bare decoder (an embedding model) may come from a checkpoint of the causal LM ("model.").
    for alias in (name, "language_model." + name, "model.language_model." + rest, "model." + name):
        if alias in where:
            return [(alias, ...)]
    if name.endswith(".mlp.gate.weight"):  # Mixtral's router
        old = name.removesuffix(".mlp.gate.weight") + ".block_sparse_moe.gate.weight"
        return [(old, ...)] if old in where else None
    m = _EXPERT.fullmatch(name)
    if m is None or len(shape) != 3:
        return None
    pre, experts = m["pre"], shape[0]
    # Per expert: the checkpoint names of gate_up's halves (gate first), or of down.
    table: dict[str, list[tuple[str, ...]]] = {
        "gate_up_proj": [("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
                         ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight")],
        "down_proj": [("mlp.experts.{e}.down_proj.weight",), ("block_sparse_moe.experts.{e}.w2.weight",)],
    }
    for parts in table[m["what"]]:
        found = [(f"{pre}.{p.format(e=e)}", e, i) for e in range(experts) for i, p in enumerate(parts)]
        if all(n in where for n, _, _ in found):
            half = shape[1] // len(parts)
            return [(n, (e, slice(i * half, (i + 1) * half))) for n, e, i in found]
    return None


def fill_from_safetensors(model_dir: Path, specs: list[TensorSpec], arena: torch.Tensor) -> None:
    """Copies every tensor of the layout from the checkpoint into the arena (sharded or not;
    per-expert matrices into their 3-D expert tensors). Floating-point tensors are cast to the
    layout's dtype, but never into or out of fp8: that needs scales, and only a checkpoint whose
    config declares fp8 has them (``modelserver.fp8``)."""
    from safetensors import safe_open

    where = _weight_files(Path(model_dir))
    plans = {s.name: _sources(s.name, s.shape, where) for s in specs}
    missing = [n for n, p in plans.items() if p is None]
    if missing:
        raise InvalidArgument(f"checkpoint lacks {len(missing)} tensors, first {missing[0]}", field="model_dir")
    by_file: dict[Path, list[tuple[TensorSpec, str, Any]]] = {}
    for s in specs:
        for src, index in plans[s.name] or []:
            by_file.setdefault(where[src], []).append((s, src, index))
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt") as st:
            for s, src_name, index in group:
                dst = view(arena, s)[index]
                src = st.get_tensor(src_name)
                if tuple(src.shape) != tuple(dst.shape):
                    if src.numel() == dst.numel() == 1:  # a per-tensor scale saved as [] or [1]
                        src = src.reshape(dst.shape)
                    else:
                        raise InvalidArgument(f"{src_name}: checkpoint shape {tuple(src.shape)} != "
                                              f"{tuple(dst.shape)}", field="model_dir")
                if (src.dtype.itemsize == 1) != (dst.dtype.itemsize == 1) and (src.is_floating_point()
                                                                             or dst.is_floating_point()):
                    raise InvalidArgument(
                        f"{src_name}: checkpoint dtype {src.dtype} where the model expects {dst.dtype} (an "
                        "fp8 checkpoint needs its quantization_config in config.json; nothing is cast "
                        "without its scales)", field="model_dir")
                dst.copy_(src)


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling defaults of the checkpoint's ``generation_config.json`` that apply when a
    request gives none, as vLLM takes them: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty`` and ``max_tokens`` (from ``max_new_tokens``); only well-typed,
    in-range values (``do_sample`` is not one: like vLLM, a model that publishes a temperature
    samples with it). Empty when the file is absent or unreadable."""
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    ranges = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
              "repetition_penalty": (0.0, 2.0)}
    for key, (lo, hi) in ranges.items():
        v = data.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi and not (
                key in ("top_p", "repetition_penalty") and v == 0):
            out[key] = float(v)
    for key, name in (("top_k", "top_k"), ("max_new_tokens", "max_tokens")):
        v = data.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31:
            out[name] = v
    return out


def view(arena: torch.Tensor, s: TensorSpec) -> torch.Tensor:
    """The arena bytes of ``s`` as a tensor of its dtype and shape."""
    return arena[s.offset: s.offset + s.nbytes].view(getattr(torch, s.dtype)).view(s.shape)


def _set(model: nn.Module, path: str, tensor: torch.Tensor, as_param: bool) -> None:
    mod_name, _, leaf = path.rpartition(".")
    mod = model.get_submodule(mod_name)
    if as_param:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor


def bind(sk: Skeleton, specs: list[TensorSpec], arena: torch.Tensor) -> None:
    """Binds every arena tensor (under all its aliases) and moves derived buffers to the device."""
    known = {name for name, _, _ in sk.entries}
    got = {s.name for s in specs}
    if known != got:
        extra = sorted(known ^ got)
        raise InvalidArgument(f"manifest does not match the model: {extra[0]} and {len(extra) - 1} more",
                              field="manifest")
    params = {n for n, _ in sk.model.named_parameters(remove_duplicate=False)}
    for s in specs:
        if (s.dtype, s.shape) != next((d, sh) for n, d, sh in sk.entries if n == s.name):
            raise InvalidArgument(f"manifest tensor {s.name} has the wrong dtype or shape", field="manifest")
        t = view(arena, s)
        for alias in sk.aliases[s.name]:
            _set(sk.model, alias, t, alias in params)
    for path, buf in sk.cpu_buffers.items():
        _set(sk.model, path, buf.to(arena.device), as_param=False)


def unbind(sk: Skeleton) -> None:
    """Points every arena-bound tensor back at the meta device, dropping all arena views."""
    params = {n for n, _ in sk.model.named_parameters(remove_duplicate=False)}
    for name, dtype, shape in sk.entries:
        meta = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for alias in sk.aliases[name]:
            _set(sk.model, alias, meta, alias in params)
    for path, buf in sk.cpu_buffers.items():
        _set(sk.model, path, buf, as_param=False)
