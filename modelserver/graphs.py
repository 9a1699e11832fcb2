"""Decode steps as CUDA graphs: one per (batch, block-table width) bucket.

A decode step of a small model is bound by the CPU launching a few thousand kernels one by one;
replaying a graph launches them all at once. Both sides of a bucket are rounded up to a power of
two, and a bucket is captured the second time it is needed (a bucket seen once costs nothing).
Padding rows write their K/V into a scratch block kept out of the allocator, and read only it.

The graphs point at the KV pool's tensors, so they are dropped when the pool grows (captured
again on use) and when the engine closes (a parked instance holds no GPU memory for them). A
capture that fails, or running out of memory with graphs held, drops them all and leaves the
engine decoding eagerly from then on.

The policy and the packing are pure and unit-tested without a GPU: ``bucket``,
``CaptureOnSecondUse`` and ``pack``. ``DecodeGraphs`` is the CUDA part the engine calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modelserver.kvcache import KVPool, StepMeta

__all__ = ["CaptureOnSecondUse", "DecodeGraphs", "DecodeRow", "bucket", "pack"]

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (batch, block-table width), both powers of two


@dataclass(frozen=True)
class DecodeRow:
    """One running request's inputs to a decode step."""

    token: int  # the last token, whose K/V this step writes
    position: int  # its position: the tokens whose K/V are already in the pool
    slot: int  # the pool slot its K/V go to
    blocks: list[int]  # the request's block table


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two."""
    return 1 << max(0, n - 1).bit_length()


class CaptureOnSecondUse:
    """Counts how often each bucket was needed without a graph; the second time, capture it.
    The counts outlive dropped graphs, so a bucket dropped with the old pool is captured again
    on its next use."""

    def __init__(self) -> None:
        self._seen: dict[Key, int] = {}

    def wants(self, key: Key) -> bool:
        """Called when ``key`` has no graph: whether to capture one now."""
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key] >= 2


def pack(rows: Sequence[DecodeRow], batch: int, width: int, scratch: int, block_size: int) -> list[int]:
    """The static input of a ``(batch, width)`` graph for ``rows``: the input ids, positions,
    slots and sequence lengths (``batch`` each), then the block table (``batch`` x ``width``).
    Padding rows write to and read only the scratch block."""
    pad = batch - len(rows)
    packed = ([r.token for r in rows] + [0] * pad
              + [r.position for r in rows] + [0] * pad
              + [r.slot for r in rows] + [scratch * block_size] * pad
              + [r.position + 1 for r in rows] + [1] * pad)
    for r in rows:
        packed += r.blocks + [0] * (width - len(r.blocks))
    packed += ([scratch] + [0] * (width - 1)) * pad
    return packed


@dataclass
class _Graph:
    """A captured decode step, its static input (as ``pack`` lays it out) and its output."""

    graph: Any
    packed: torch.Tensor
    logits: torch.Tensor


class DecodeGraphs:
    """The decode graphs of one engine. Used from the engine thread only.

    ``enabled`` is False off CUDA, with ``cuda_graphs`` off, with a one-block pool, or after a
    failure; ``decode`` then returns None and the engine runs the step eagerly."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, cuda_graphs: bool) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.enabled = cuda_graphs and self.supports(device) and pool.allocator.num_blocks > 1
        # The scratch block never returns to the allocator: it is the pool's cost of the graphs.
        self.scratch = pool.allocator.take(1)[0] if self.enabled else -1
        self.reserved_blocks = 1 if self.enabled else 0
        self._mempool: Any = None  # one memory pool for all the graphs, made at the first capture
        self._graphs: dict[Key, _Graph] = {}
        self._policy = CaptureOnSecondUse()
        self.captured = 0  # graphs captured, ever
        self.replays = 0  # decode steps run by replay

    @staticmethod
    def supports(device: torch.device) -> bool:
        """Whether decode steps on ``device`` can be captured: CUDA only."""
        return device.type == "cuda"

    def __len__(self) -> int:
        return len(self._graphs)

    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor | None:
        """The step's logits ``[len(rows), V]`` by graph replay; None when the bucket has no
        graph (yet) or graphs are off: the caller then runs the step eagerly."""
        if not self.enabled:
            return None
        key = (bucket(len(rows)), bucket(max(len(r.blocks) for r in rows)))
        graph = self._graphs.get(key)
        if graph is None:
            if not self._policy.wants(key):
                return None
            try:
                graph = self._capture(*key)
            except Exception:  # an op that cannot be captured: decode eagerly from now on
                log.exception("engine: CUDA graph capture failed; decoding without graphs")
                self._disable()
                return None
            self._graphs[key] = graph
            self.captured += 1
            log.info("engine: captured the decode step for batch %d, %d blocks", *key)
        graph.packed.copy_(torch.tensor(pack(rows, *key, self.scratch, self.pool.block_size), dtype=torch.int64))
        graph.graph.replay()
        self.replays += 1
        return graph.logits[0, :len(rows)]

    def drop(self) -> None:
        """Frees every graph (the pool is growing, or the engine closing); buckets needed again
        are captured again."""
        self._graphs.clear()

    def on_out_of_memory(self) -> bool:
        """A step ran out of memory: if graphs are held, drops them, decodes eagerly from now on
        and returns True (their memory pool may have taken the room: the step is worth a retry)."""
        if not self._graphs:
            return False
        log.warning("engine: out of memory with %d CUDA graphs; dropping them", len(self._graphs))
        self._disable()
        torch.cuda.empty_cache()
        return True

    def _disable(self) -> None:
        self._graphs.clear()
        self.enabled = False

    def _static_step(self, b: int, w: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """The static input of a ``(b, w)`` step, laid out by ``pack`` (pad rows only until a
        replay fills it), and the forward over it (logits ``[1, b, V]``)."""
        packed = torch.tensor(pack([], b, w, self.scratch, self.pool.block_size), dtype=torch.int64,
                              device=self.device)
        meta = StepMeta(self.pool, packed[2 * b:3 * b], prefill=False, block_table=packed[4 * b:].view(b, w),
                        seq_lens=packed[3 * b:4 * b])
        ids, pos = packed[:b].view(1, b), packed[b:2 * b].view(1, b)

        def step() -> torch.Tensor:
            return self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0,
                              paged=meta).logits

        return packed, step

    def _capture(self, b: int, w: int) -> _Graph:
        """Captures the decode step for ``b`` rows and ``w`` blocks of table."""
        dev = self.device
        packed, step = self._static_step(b, w)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture (lazy initialisation, cuBLAS handles)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = step()
        return _Graph(graph, packed, logits)
