"""The KV pool's block allocator and the packed-prefill mask (pure)."""

from __future__ import annotations

import pytest

from runtime.kvcache import BlockAllocator, blocks_for
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
