"""The GPU memory slice an instance is given, turned into limits it can keep.

A slice holds the weight arena, the KV cache and the activations. The model server sizes its context
so the KV cache of the longest request fits what the arena leaves, refuses a start whose slice
cannot hold the weights plus a minimal context, and caps PyTorch's caching allocator at the
rest of the slice, so an instance that would outgrow its slice fails its own request with a
clear error instead of taking memory from its neighbours on the same GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapwake.errors import StartFailed

__all__ = ["DEFAULT_POOL_SEQUENCES", "MIN_CONTEXT", "SliceBudget", "kv_bytes_per_token", "plan_slice"]

# Shorter than this and the model could not answer a chat turn: refuse the start instead.
MIN_CONTEXT = 64
# Activations, library workspaces and the decode CUDA graphs' memory pool, kept out of the KV
# budget (256 MiB was too little for the graphs of a batch of 32 on the H100).
_RESERVE_FRACTION, _RESERVE_MIN = 0.05, 768 << 20
# With no slice, the KV pool holds this many full-context sequences (or half the free memory).
DEFAULT_POOL_SEQUENCES = 16


@dataclass(frozen=True)
class SliceBudget:
    """What a slice allows: the context length, the KV pool and the allocator cap (0 = no cap)."""

    max_context: int
    allocator_bytes: int
    kv_tokens: int
    """Tokens the paged KV pool holds, shared by every request in flight."""


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of K and V one token adds across every layer."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def plan_slice(slice_bytes: int, arena_bytes: int, per_token: int, max_positions: int,
               free_bytes: int = 0) -> SliceBudget:
    """The limits for a slice. With no slice (0), the pool holds ``DEFAULT_POOL_SEQUENCES``
    full contexts, or half of ``free_bytes`` (what the device has free) when that is less."""
    if slice_bytes <= 0:
        tokens = DEFAULT_POOL_SEQUENCES * max_positions
        if free_bytes > 0 and per_token > 0:
            tokens = min(tokens, free_bytes // 2 // per_token)
        tokens = max(tokens, MIN_CONTEXT)
        return SliceBudget(min(max_positions, tokens), 0, tokens)
    reserve = max(_RESERVE_MIN, int(slice_bytes * _RESERVE_FRACTION))
    kv_room = slice_bytes - arena_bytes - reserve
    tokens = kv_room // per_token if per_token > 0 else max_positions
    if tokens < MIN_CONTEXT:
        raise StartFailed(
            f"gpu_memory_bytes: a slice of {slice_bytes / 2**30:.2f} GiB cannot hold the weights "
            f"({arena_bytes / 2**30:.2f} GiB), {reserve / 2**30:.2f} GiB of workspace and a KV cache of "
            f"{MIN_CONTEXT} tokens ({MIN_CONTEXT * per_token / 2**20:.1f} MiB)")
    return SliceBudget(int(min(max_positions, tokens)), slice_bytes - arena_bytes, int(tokens))
