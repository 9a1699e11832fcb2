"""The KV pool: its block allocator and its growth (CPU tensors)."""

from __future__ import annotations

import pytest
import torch

from modelserver.kvcache import BlockAllocator, KVPool, blocks_for
from snapwake.errors import ResourceExhausted


@pytest.mark.parametrize(("tokens", "want"), [(1, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_blocks_for_rounds_up_to_whole_blocks(tokens: int, want: int) -> None:
    assert blocks_for(tokens, 16) == want


def test_allocator_hands_out_distinct_blocks_and_takes_them_back() -> None:
    alloc = BlockAllocator(4)
    a, b = alloc.take(3), alloc.take(1)
    assert sorted(a + b) == [0, 1, 2, 3] and alloc.free == 0
    with pytest.raises(ResourceExhausted, match="0 free blocks, 1 needed"):
        alloc.take(1)
    alloc.give(a)
    assert alloc.free == 3
    assert sorted(alloc.take(3)) == sorted(a)


def test_a_failed_take_takes_nothing() -> None:
    alloc = BlockAllocator(3)
    with pytest.raises(ResourceExhausted):
        alloc.take(4)
    assert alloc.free == 3


def test_giving_a_block_back_twice_is_refused() -> None:
    alloc = BlockAllocator(2)
    blocks = alloc.take(2)
    alloc.give(blocks)
    with pytest.raises(ValueError, match="given back twice"):
        alloc.give(blocks[:1])
    with pytest.raises(ValueError, match="given back twice"):
        BlockAllocator(2).give([0, 0])


def test_allocator_refuses_an_empty_pool() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_extend_adds_free_blocks_after_the_ones_already_free() -> None:
    alloc = BlockAllocator(2)
    held = alloc.take(1)
    alloc.extend(5)
    assert alloc.num_blocks == 5 and alloc.free == 4
    assert alloc.take(1) == [1]  # the old free block first, then the new ones
    assert sorted(alloc.take(3)) == [2, 3, 4]
    alloc.give(held)
    with pytest.raises(ValueError, match="cannot shrink"):
        alloc.extend(3)


def test_pool_grows_by_doubling_up_to_its_budget_keeping_every_block() -> None:
    pool = KVPool(layers=2, num_blocks=10, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu",
                  block_size=4, initial_blocks=3)
    assert pool.tokens == 40 and pool.allocator.num_blocks == 3 and pool.nbytes == 2 * 2 * 12 * 2 * 4
    pool.k[1][5] = 7.0  # a token in block 1 of layer 1
    assert pool.grow() and pool.allocator.num_blocks == 6
    assert pool.grow() and pool.allocator.num_blocks == 10  # capped at the budget
    assert not pool.can_grow() and not pool.grow()
    assert all(t.shape == (40, 1, 2) for t in (*pool.k, *pool.v))
    assert torch.equal(pool.k[1][5], torch.tensor([[7.0, 7.0]])) and float(pool.k[1][4].abs().sum()) == 0.0
