"""The paged KV cache: one pool of fixed-size blocks per instance, and the attention over it.

The pool's budget comes from the instance's GPU slice (``modelserver.budget``); it starts small
and doubles on demand up to that budget (``KVPool.grow``). A request holds the blocks its
tokens need and gives them back when it ends, so memory goes to tokens actually in flight,
not to ``max_context`` per request, and many short requests fit where one long one would.

Layout, per layer: K and V as ``[num_blocks * block_size, kv_heads, head_dim]`` (a token's
slot is ``block * block_size + offset``). The model runs with the attention implementation
``snapwake_paged``, registered with transformers' ``AttentionInterface``: each step the
engine passes a ``StepMeta`` (kwarg ``paged``) that says where the step's new K/V go and which
blocks each sequence reads. Two kinds of step:

- prefill: the new prompts of several sequences packed into one row (the projections and MLPs
  run once for all); attention is causal SDPA per sequence over the step's own K/V (flash,
  no mask, memory linear in the prompt).
- decode: one token per sequence; each sequence reads its blocks (gathered through its block
  table, up to the longest sequence in the step) under a length mask. Grouped-query heads are
  folded into the query length, so K/V are never repeated per head, and rows are gathered in
  chunks of at most ``GATHER_BYTES`` so a long context cannot outgrow the slice's workspace.

Per-layer variants come from the attention module's own keyword arguments, as transformers
passes them to every attention implementation: ``sliding_window`` (Mistral, Gemma-2/3's local
layers, Qwen2's sliding layers: a query sees its own token and the ``window - 1`` before it)
narrows the mask, and ``softcap`` (Gemma-2: ``tanh(s / c) * c`` on the scores) needs the scores
themselves, so those layers compute them explicitly instead of through SDPA. Layers without
either (Llama, Qwen) run exactly the SDPA calls above.

``BlockAllocator`` is the pure part (a free list with counts); it is unit-tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from snapwake.errors import ResourceExhausted

__all__ = ["ATTN_IMPLEMENTATION", "BLOCK_SIZE", "BlockAllocator", "KVPool", "StepMeta", "blocks_for",
           "paged_attention", "register"]

ATTN_IMPLEMENTATION = "snapwake_paged"
BLOCK_SIZE = 16
GATHER_BYTES = 32 << 20  # K (and V) gathered at once in a decode step, per layer


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks needed to hold ``tokens`` tokens."""
    return -(-tokens // block_size)


class BlockAllocator:
    """Hands out block numbers from a fixed pool. Pure; not thread-safe (the engine thread owns it)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low numbers first

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """``n`` blocks, or ``ResourceExhausted`` (nothing taken) when fewer are free."""
        if n > len(self._free):
            raise ResourceExhausted(f"the KV pool has {len(self._free)} free blocks, {n} needed")
        return [self._free.pop() for _ in range(n)]

    def extend(self, num_blocks: int) -> None:
        """Grows the pool to ``num_blocks``; the new numbers are free."""
        if num_blocks < self.num_blocks:
            raise ValueError(f"cannot shrink the pool from {self.num_blocks} to {num_blocks} blocks")
        self._free[:0] = range(num_blocks - 1, self.num_blocks - 1, -1)  # after the free low ones
        self.num_blocks = num_blocks

    def give(self, blocks: list[int]) -> None:
        """Returns blocks to the pool; giving one back twice is a bug and raises."""
        if len(set(blocks)) != len(blocks) or len(self._free) + len(blocks) > self.num_blocks:
            raise ValueError(f"blocks given back twice: {sorted(blocks)}")
        self._free.extend(blocks)


class KVPool:
    """The K and V tensors of every layer, and their allocator.

    ``num_blocks`` is the budget (what the slice allows); the tensors start at
    ``initial_blocks`` and ``grow`` doubles them, layer by layer, up to the budget. So an
    instance holds KV memory for the load it has seen, not for its whole slice: a
    process-mode checkpoint (which moves every device allocation to host memory) and the
    zeroing at attach stay small.
    """

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = BLOCK_SIZE, initial_blocks: int | None = None) -> None:
        self.max_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads, self.head_dim, self.dtype, self.device = kv_heads, head_dim, dtype, device
        cap = num_blocks if initial_blocks is None else max(1, min(num_blocks, initial_blocks))
        self.k = [self._zeros(cap) for _ in range(layers)]
        self.v = [self._zeros(cap) for _ in range(layers)]
        self.allocator = BlockAllocator(cap)

    def _zeros(self, blocks: int) -> torch.Tensor:
        # Zeroed, not empty: masked-out slots still enter the attention product (weight 0), and
        # 0 x NaN from stale memory would be NaN.
        return torch.zeros((blocks * self.block_size, self.kv_heads, self.head_dim), dtype=self.dtype,
                           device=self.device)

    def can_grow(self) -> bool:
        return self.allocator.num_blocks < self.max_blocks

    def grow(self) -> bool:
        """Doubles the pool (up to the budget), keeping every block's contents and number. One
        layer at a time, the old tensor freed before the next, so the peak is one layer over.
        Out of device memory, the budget shrinks to what there is and it returns False."""
        old = self.allocator.num_blocks
        new = min(self.max_blocks, 2 * old)
        if new <= old:
            return False
        try:
            for tensors in (self.k, self.v):
                for i, t in enumerate(tensors):
                    if t.shape[0] == new * self.block_size:
                        continue  # grown by an attempt that ran out of memory later
                    bigger = self._zeros(new)
                    bigger[: t.shape[0]].copy_(t)
                    tensors[i] = bigger
                    del t
                    if torch.device(self.device).type == "cuda":
                        torch.cuda.empty_cache()  # the old segment back to the driver for the next layer
        except torch.OutOfMemoryError:
            self.max_blocks = old
            return False
        self.allocator.extend(new)
        return True

    def free(self) -> None:
        """Drops the K and V memory now (the instance is releasing its GPU memory)."""
        self.k, self.v = [], []

    @property
    def tokens(self) -> int:
        """Tokens the pool can hold at its budget."""
        return self.max_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return sum(t.nbytes for t in (*self.k, *self.v))


@dataclass
class StepMeta:
    """Where one forward step writes and reads in the pool (tensors on the model's device)."""

    pool: KVPool
    slots: torch.Tensor
    """[T] int64: the pool slot of each new token, in packed order."""
    prefill: bool
    cu_seqlens: list[int] | None = None
    """prefill: start offsets of each sequence in the packed row, plus the total."""
    block_table: torch.Tensor | None = None
    """decode: [S, max_blocks] int64, padded with block 0."""
    seq_lens: torch.Tensor | None = None
    """decode: [S] int64, tokens each sequence attends to (its new token included)."""


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
              softcap: float | None) -> torch.Tensor:
    """Attention with the scores computed (and soft-capped) explicitly, as transformers' eager
    attention does. ``q`` [..., Tq, D], ``k``/``v`` [..., Tk, D] (heads already matched), ``mask``
    boolean (True: attend), broadcastable to the scores."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int | None,
                 softcap: float | None) -> torch.Tensor:
    """One sequence's prefill attention ``[1, H, T, D]`` with a sliding window or soft-capping:
    queries in chunks, so the explicit scores stay within ``GATHER_BYTES``."""
    heads, length = q.shape[1], q.shape[2]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    rows = max(1, GATHER_BYTES // (heads * length * 4))
    cols = torch.arange(length, device=q.device)
    outs = []
    for r0 in range(0, length, rows):
        r = cols[r0:r0 + rows, None]
        mask = cols[None, :] <= r
        if window is not None:
            mask &= cols[None, :] > r - window
        if softcap is None:
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, r0:r0 + rows], k, v, attn_mask=mask, scale=scale))
        else:
            outs.append(_explicit(q[:, :, r0:r0 + rows], k, v, mask, scale, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    paged: StepMeta | None = None, sliding_window: int | None = None,
                    softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over the paged pool. ``query`` [1, H, T, D]; ``key``/``value`` [1, KVH, T, D] (the
    step's new tokens, rotary applied). Returns [1, T, H, D] as transformers expects. Called
    without a ``StepMeta`` (a plain forward of the model, outside the engine), it is transformers'
    SDPA over the mask the model built (its eager attention where scores are soft-capped)."""
    if paged is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if softcap is not None:
            from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

            out, _ = eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, softcap=softcap, **kwargs)
            return out, None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layer = module.layer_idx
    kc, vc = paged.pool.k[layer], paged.pool.v[layer]
    kc.index_copy_(0, paged.slots, key[0].transpose(0, 1))  # [T, KVH, D]
    vc.index_copy_(0, paged.slots, value[0].transpose(0, 1))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if paged.prefill:
        cu = paged.cu_seqlens
        assert cu is not None
        if softcap is None and (sliding_window is None or max(b - a for a, b in zip(cu, cu[1:], strict=False))
                                <= sliding_window):
            outs = [sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
                         enable_gqa=True) for a, b in zip(cu, cu[1:], strict=False)]
        else:
            outs = [_prefill_one(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling, sliding_window,
                                 softcap) for a, b in zip(cu, cu[1:], strict=False)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).transpose(1, 2), None
    assert paged.block_table is not None and paged.seq_lens is not None
    heads, dim = query.shape[1], query.shape[3]
    bs = paged.pool.block_size
    seqs, width = paged.block_table.shape
    kv_heads = kc.shape[1]
    length = width * bs
    q = query[0].transpose(0, 1).reshape(seqs, kv_heads, heads // kv_heads, dim)  # [S, KVH, G, D]
    rows = max(1, GATHER_BYTES // (length * kv_heads * dim * kc.element_size()))
    positions = torch.arange(length, device=kc.device)
    outs = []
    for r0 in range(0, seqs, rows):
        table = paged.block_table[r0:r0 + rows]
        n = table.shape[0]
        k = kc.view(-1, bs, kv_heads, dim)[table].view(n, length, kv_heads, dim).transpose(1, 2)
        v = vc.view(-1, bs, kv_heads, dim)[table].view(n, length, kv_heads, dim).transpose(1, 2)
        lens = paged.seq_lens[r0:r0 + rows, None]
        mask = positions[None, :] < lens
        if sliding_window is not None:
            mask &= positions[None, :] >= lens - sliding_window
        mask = mask[:, None, None, :]
        if softcap is None:
            outs.append(sdpa(q[r0:r0 + n], k, v, attn_mask=mask, scale=scaling))  # [n, KVH, G, D]
        else:
            outs.append(_explicit(q[r0:r0 + n], k, v, mask, scaling, softcap))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(1, seqs, heads, dim), None


_registered = False


def register() -> None:
    """Registers ``snapwake_paged`` with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
        _registered = True
