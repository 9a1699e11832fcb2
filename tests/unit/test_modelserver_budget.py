from __future__ import annotations

from types import SimpleNamespace

import pytest

from modelserver.budget import MIN_CONTEXT, SliceBudget, kv_bytes_per_token, plan_slice
from snapwake.errors import StartFailed

GIB, MIB = 1 << 30, 1 << 20
LLAMA_8B = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, hidden_size=4096)


def test_kv_bytes_per_token_of_llama_8b_in_bf16() -> None:
    assert kv_bytes_per_token(LLAMA_8B, 2) == 128 * 1024  # 2 (K,V) x 32 layers x 8 heads x 128 x 2 B


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, hidden_size=64)
    assert kv_bytes_per_token(cfg, 4) == 2 * 2 * 4 * 16 * 4


@pytest.mark.parametrize(("slice_bytes", "arena", "per_token", "max_pos", "want"), [
    (0, 15 * GIB, 128 << 10, 8192, SliceBudget(8192, 0, 16 * 8192)),  # no slice: 16 full contexts
    # room for the full context; the pool holds what the slice leaves (5 GiB - 1 GiB reserve)
    (20 * GIB, 15 * GIB, 128 << 10, 8192, SliceBudget(8192, 5 * GIB, 4 * GIB // (128 << 10))),
    (2 * GIB, 0, 1 << 20, 100_000, SliceBudget((2 * GIB - 768 * MIB) // (1 << 20), 2 * GIB,
                                               (2 * GIB - 768 * MIB) // (1 << 20))),  # KV-bound
])
def test_slice_plans(slice_bytes: int, arena: int, per_token: int, max_pos: int, want: SliceBudget) -> None:
    assert plan_slice(slice_bytes, arena, per_token, max_pos) == want


def test_no_slice_pool_takes_at_most_half_of_free_memory() -> None:
    got = plan_slice(0, 15 * GIB, 128 << 10, 8192, free_bytes=2 * GIB)
    assert got.kv_tokens == GIB // (128 << 10)
    assert got.max_context == 8192 and got.allocator_bytes == 0
    tiny = plan_slice(0, 0, 1 << 20, 8192, free_bytes=16 * MIB)  # never below a minimal context
    assert tiny.kv_tokens == MIN_CONTEXT and tiny.max_context == MIN_CONTEXT


def test_context_is_what_the_kv_room_holds() -> None:
    got = plan_slice(16 * GIB, 15 * GIB, 128 << 10, 131072)
    reserve = int(16 * GIB * 0.05)
    assert got.max_context == (16 * GIB - 15 * GIB - reserve) // (128 << 10)
    assert got.allocator_bytes == GIB


def test_a_slice_that_cannot_hold_the_weights_is_refused_naming_the_field() -> None:
    with pytest.raises(StartFailed, match="gpu_memory_bytes: a slice of 15.00 GiB cannot hold the weights"):
        plan_slice(15 * GIB, 15 * GIB, 128 << 10, 8192)
    with pytest.raises(StartFailed, match=f"KV cache of {MIN_CONTEXT} tokens"):
        plan_slice(16 * GIB, 15 * GIB, 4 * MIB, 8192)  # ~200 MiB of KV room: 50 tokens
