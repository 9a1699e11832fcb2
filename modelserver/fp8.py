"""fp8 (e4m3) weights kept in fp8 in the arena, dequantised per layer at compute.

A checkpoint that ``snapwake.modelsupport.fp8_scheme`` accepts has, beside each quantised
Linear's ``weight`` (``float8_e4m3fn``, [out, in]), its scale: one per tensor ([1]), per output
channel ([out, 1]) or per block ([ceil(out / b0), ceil(in / b1)]). ``quantise_skeleton`` swaps
those Linears of the meta skeleton for ``Fp8Linear``, whose parameters are exactly the
checkpoint's tensors, so the arena holds the fp8 bytes (half of bf16) and the scales, and every
step computes ``x @ (weight * scale).T`` in the model's dtype. Activation scales
(``input_scale``) are not used: the weights are dequantised, the activations stay in the model's
dtype (weight-only fp8).
"""

from __future__ import annotations

import torch
from torch import nn

from snapwake.modelsupport import Fp8Scheme

__all__ = ["Fp8Linear", "quantise_skeleton"]


class Fp8Linear(nn.Module):
    """A Linear whose weight is fp8 with its scale; forward dequantises into the input's dtype."""

    def __init__(self, linear: nn.Linear, scheme: Fp8Scheme) -> None:
        super().__init__()
        out, inp = linear.out_features, linear.in_features
        self.in_features, self.out_features = inp, out
        self.block = scheme.block
        self.scale_name = scheme.scale_name
        self.weight = nn.Parameter(torch.empty((out, inp), dtype=torch.float8_e4m3fn), requires_grad=False)
        if scheme.block is not None:
            shape: tuple[int, ...] = (-(-out // scheme.block[0]), -(-inp // scheme.block[1]))
        else:
            shape = (out, 1) if scheme.channel else (1,)
        self.register_parameter(scheme.scale_name, nn.Parameter(torch.empty(shape, dtype=torch.float32),
                                                                requires_grad=False))
        self.bias = linear.bias

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: fp8 values times their scales."""
        scale = getattr(self, self.scale_name).to(dtype)
        if self.block is not None:
            b0, b1 = self.block
            scale = scale.repeat_interleave(b0, 0)[:self.out_features].repeat_interleave(b1, 1)[:, :self.in_features]
        return self.weight.to(dtype) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantised(x.dtype), self.bias)


def quantise_skeleton(model: nn.Module, scheme: Fp8Scheme) -> int:
    """Replaces every Linear the scheme quantises with an ``Fp8Linear`` (on the meta device, as
    the skeleton is); returns how many."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    tied = getattr(embeddings, "weight", None)
    swaps = [(name, mod) for name, mod in model.named_modules()  # a head tied to the embeddings stays as it is
             if isinstance(mod, nn.Linear) and scheme.quantised(name) and mod.weight is not tied]
    with torch.device("meta"):
        for name, mod in swaps:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, Fp8Linear(mod, scheme))
    return len(swaps)
