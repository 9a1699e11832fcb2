"""The token loop: continuous batching over a paged KV pool.

One engine thread owns the model. Requests are submitted from any thread and join the running
batch at the next step; a step is

1. drop cancelled requests (their blocks go back at once);
2. admit waiting requests while the pool has blocks for them and the batch has room, and
   prefill them together in one packed forward (bounded by ``prefill_tokens``);
3. one decode forward for every running request (one new token each).

When a running request needs a new block and none is free, the most recently admitted request
is preempted: its blocks are freed and it goes back to the head of the queue, to be prefilled
again (prompt plus what it generated so far) when blocks free up; its client sees nothing but
a short pause. Sampling is per request (greedy at temperature 0, else top-p with the request's
own seeded generator); stop strings and detokenization are per request too.

On CUDA, decode steps replay CUDA graphs: one per (batch, block-table width) bucket, both
rounded up to a power of two, captured the second time a bucket is needed (a bucket seen once
costs nothing). A decode step of a small model is otherwise bound by the CPU launching a few
thousand kernels one by one; replaying a graph launches them all at once. Padding rows write
their K/V into a scratch block kept out of the allocator, and read only it. The graphs live as
long as the engine: ``close`` drops them with the KV pool, so a parked instance holds no GPU
memory for them.

``close`` stops admitting, lets the running requests finish (bounded), and stops the thread;
the instance calls it before it unmaps the weights.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelserver.kvcache import ATTN_IMPLEMENTATION, KVPool, StepMeta, blocks_for, register
from modelserver.sampling import SamplingParams
from modelserver.stops import StopFilter
from snapwake.errors import ResourceExhausted, SnapwakeError, Unavailable

__all__ = ["Engine", "Piece", "bucket", "next_token"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Text produced since the last piece; the last piece carries ``finish_reason``."""

    text: str
    finish_reason: str | None
    completion_tokens: int


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Picks the next token from 1-D logits: greedy at temperature 0, else top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (the CUDA graph buckets)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Graph:
    """A captured decode step and its static inputs: one int64 buffer holding, in order, the
    input ids, positions, slots and sequence lengths ([batch] each), then the block table."""

    graph: Any
    packed: torch.Tensor
    logits: torch.Tensor


@dataclass(eq=False)
class _Seq:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    cancel: threading.Event
    emit: Callable[[Piece], None]
    limit: int
    gen: torch.Generator | None
    stops: StopFilter
    order: int
    out: list[int] = field(default_factory=list)
    sent: str = ""
    blocks: list[int] = field(default_factory=list)
    kv_len: int = 0
    """Tokens whose K/V are in the pool."""
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


class Engine:
    """Generates completions for many requests at once with a bound model and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: set[int], pool: KVPool,
                 max_context: int, max_batch: int = 64, prefill_tokens: int = 4096,
                 cuda_graphs: bool = True) -> None:
        register()
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pool = pool
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._device = next(model.parameters()).device
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._seen: dict[tuple[int, int], int] = {}
        self._use_graphs = cuda_graphs and self._device.type == "cuda" and pool.allocator.num_blocks > 1
        self._scratch = pool.allocator.take(1)[0] if self._use_graphs else -1
        self._graph_pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self.max_context = min(max_context, (pool.max_blocks - (1 if self._use_graphs else 0)) * pool.block_size)
        self._cv = threading.Condition()
        self._inbox: list[_Seq] = []
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._closed = False
        self._fatal: BaseException | None = None
        self._order = 0
        self.stats = {"steps": 0, "batch_peak": 0, "preempted": 0, "generated_tokens": 0,
                      "graphs": 0, "graph_steps": 0}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # --- the callers' side ------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
                 emit: Callable[[Piece], None]) -> None:
        """Runs one request to its end, handing each piece to ``emit`` (from the engine thread)."""
        seq = self.submit(prompt_ids, params, cancel, emit)
        seq.done.wait()
        if seq.error is not None:
            raise seq.error

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
               emit: Callable[[Piece], None]) -> _Seq:
        limit = self.max_context - len(prompt_ids)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self._device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        with self._cv:
            if self._fatal is not None:
                raise Unavailable(f"the engine stopped after an error: {self._fatal}")
            if self._closed:
                raise Unavailable("the model is being released")
            self._order += 1
            seq = _Seq(list(prompt_ids), params, cancel, emit, limit, gen, StopFilter(params.stop), self._order)
            self._inbox.append(seq)
            self._cv.notify()
        return seq

    def close(self, drain_s: float = 300.0) -> None:
        """Stops admitting; running and queued requests finish (cancelled after ``drain_s``)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(drain_s)
        if self._thread.is_alive():
            log.warning("engine: requests still running after %.0f s; cancelling them", drain_s)
            with self._cv:
                for seq in [*self._inbox, *self._waiting, *self._running]:
                    seq.cancel.set()
            self._thread.join(30.0)

    # --- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not (self._inbox or self._waiting or self._running):
                            if self._closed:
                                return
                            self._cv.wait()
                        self._waiting.extend(self._inbox)
                        self._inbox.clear()
                    self._step()
            self._graphs.clear()  # closing: the graphs' memory goes with the KV pool
        except BaseException as exc:  # a bug: fail everything now and every later request
            log.exception("engine thread failed")
            with self._cv:
                self._fatal = exc
                seqs = [*self._inbox, *self._waiting, *self._running]
                self._inbox.clear(), self._waiting.clear(), self._running.clear()
            for seq in seqs:
                self._fail(seq, Unavailable(f"the engine failed: {exc}"))

    def _step(self) -> None:
        for seq in [s for s in (*self._waiting, *self._running) if s.cancel.is_set()]:
            self._finish(seq, "cancelled")
        admitted = self._admit()
        if admitted:
            self._guarded(admitted, self._prefill)
        if self._running:
            self._guarded(list(self._running), self._decode)
        self.stats["steps"] += 1

    def _guarded(self, seqs: list[_Seq], fn: Callable[[list[_Seq]], None]) -> None:
        """Runs a forward step; if it fails, the requests in it fail and the engine goes on."""
        try:
            try:
                fn(seqs)
            except torch.OutOfMemoryError:
                if not self._graphs:
                    raise
                # The graphs' memory pool took the room: drop them, decode eagerly, retry the step
                # (a step changes nothing before its forward has run).
                log.warning("engine: out of memory with %d CUDA graphs; dropping them", len(self._graphs))
                self._graphs.clear()
                self._use_graphs = False
                torch.cuda.empty_cache()
                fn(seqs)
        except torch.OutOfMemoryError:
            log.warning("engine: out of memory in a step of %d requests", len(seqs))
            err = ResourceExhausted("the instance ran out of GPU memory in its slice; retry with fewer tokens")
            for seq in seqs:
                self._fail(seq, err)
        except SnapwakeError as exc:
            for seq in seqs:
                self._fail(seq, exc)

    def _admit(self) -> list[_Seq]:
        out: list[_Seq] = []
        budget = self.prefill_tokens
        allocator = self.pool.allocator
        while self._waiting and len(self._running) + len(out) < self.max_batch:
            seq = self._waiting[0]
            n = len(seq.tokens)
            if out and n > budget:
                break
            need = blocks_for(n + 1, self.pool.block_size)
            while need > allocator.free and self._grow():
                pass
            if need > allocator.free:
                if not self._running and not out:  # it could never fit: fail it instead of waiting forever
                    self._waiting.popleft()
                    self._fail(seq, ResourceExhausted(
                        f"{n} tokens need {need} KV blocks; the pool has {allocator.num_blocks}"))
                    continue
                break
            seq.blocks = allocator.take(need)
            self._waiting.popleft()
            out.append(seq)
            budget -= n
        return out

    def _slot(self, seq: _Seq, pos: int) -> int:
        bs = self.pool.block_size
        return seq.blocks[pos // bs] * bs + pos % bs

    def _prefill(self, seqs: list[_Seq]) -> None:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for seq in seqs:
            toks = seq.tokens
            ids += toks
            positions += range(len(toks))
            slots += [self._slot(seq, p) for p in range(len(toks))]
            cu.append(len(ids))
        dev = self._device
        meta = StepMeta(self.pool, torch.tensor(slots, device=dev), prefill=True, cu_seqlens=cu)
        last = torch.tensor([c - 1 for c in cu[1:]], device=dev)
        logits = self.model(input_ids=torch.tensor([ids], device=dev),
                            position_ids=torch.tensor([positions], device=dev),
                            use_cache=False, logits_to_keep=last, paged=meta).logits[0]
        for seq in seqs:
            seq.kv_len = len(seq.tokens)
        self._running.extend(seqs)
        self._accept_all(seqs, logits)

    def _make_room(self) -> None:
        """Every running request gets a slot for its next token; preempts the newest when out of blocks."""
        bs = self.pool.block_size
        for seq in sorted(self._running, key=lambda s: s.order):
            while seq in self._running and len(seq.blocks) < blocks_for(seq.kv_len + 1, bs):
                if self.pool.allocator.free or self._grow():
                    seq.blocks += self.pool.allocator.take(1)
                    continue
                victim = max(self._running, key=lambda s: s.order)
                self._preempt(victim)

    def _grow(self) -> bool:
        """Grows the KV pool towards its budget; the decode graphs point at the old tensors, so
        they go first (their memory helps the growth too) and are captured again on use."""
        if not self.pool.can_grow():
            return False
        self._graphs.clear()
        grown = self.pool.grow()
        log.info("engine: KV pool %s to %d blocks (budget %d)", "grew" if grown else "could not grow",
                 self.pool.allocator.num_blocks, self.pool.max_blocks)
        return grown

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self.pool.allocator.give(seq.blocks)
        seq.blocks, seq.kv_len = [], 0
        self._waiting.appendleft(seq)
        self.stats["preempted"] += 1
        log.info("engine: preempted a request of %d tokens (KV pool full)", len(seq.tokens))

    def _decode(self, _: list[_Seq]) -> None:
        self._make_room()
        seqs = list(self._running)
        if not seqs:
            return
        width = max(len(s.blocks) for s in seqs)
        logits = self._decode_graph(seqs, width) if self._use_graphs else None
        if logits is None:
            dev = self._device
            table = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
            meta = StepMeta(self.pool, torch.tensor([self._slot(s, s.kv_len) for s in seqs], device=dev),
                            prefill=False, block_table=torch.tensor(table, device=dev),
                            seq_lens=torch.tensor([s.kv_len + 1 for s in seqs], device=dev))
            logits = self.model(input_ids=torch.tensor([[s.out[-1] for s in seqs]], device=dev),
                                position_ids=torch.tensor([[s.kv_len for s in seqs]], device=dev),
                                use_cache=False, logits_to_keep=0, paged=meta).logits[0]
        for seq in seqs:
            seq.kv_len += 1
        self.stats["batch_peak"] = max(self.stats["batch_peak"], len(seqs))
        self._accept_all(seqs, logits)

    def _decode_graph(self, seqs: list[_Seq], width: int) -> torch.Tensor | None:
        """The decode step by graph replay; None when its bucket has no graph (yet)."""
        n, key = len(seqs), (bucket(len(seqs)), bucket(width))
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2:
                return None
            try:
                graph = self._capture(*key)
            except Exception:  # an op that cannot be captured: decode eagerly from now on
                log.exception("engine: CUDA graph capture failed; decoding without graphs")
                self._use_graphs = False
                self._graphs.clear()
                return None
        b, w = key
        pad_slot = self._scratch * self.pool.block_size
        table = [self._scratch] + [0] * (w - 1)
        packed = ([s.out[-1] for s in seqs] + [0] * (b - n)
                  + [s.kv_len for s in seqs] + [0] * (b - n)
                  + [self._slot(s, s.kv_len) for s in seqs] + [pad_slot] * (b - n)
                  + [s.kv_len + 1 for s in seqs] + [1] * (b - n))
        for s in seqs:
            packed += s.blocks + [0] * (w - len(s.blocks))
        packed += table * (b - n)
        graph.packed.copy_(torch.tensor(packed, dtype=torch.int64))
        graph.graph.replay()
        self.stats["graph_steps"] += 1
        return graph.logits[0, :n]

    def _capture(self, b: int, w: int) -> _Graph:
        """Captures the decode step for ``b`` rows and ``w`` blocks of table (pad rows only)."""
        dev = self._device
        pad_slot = self._scratch * self.pool.block_size
        packed = torch.zeros(4 * b + b * w, dtype=torch.int64, device=dev)
        packed[2 * b:3 * b] = pad_slot
        packed[3 * b:4 * b] = 1
        table = packed[4 * b:].view(b, w)
        table[:, 0] = self._scratch
        meta = StepMeta(self.pool, packed[2 * b:3 * b], prefill=False, block_table=table,
                        seq_lens=packed[3 * b:4 * b])
        ids, pos = packed[:b].view(1, b), packed[b:2 * b].view(1, b)

        def step() -> torch.Tensor:
            return self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0,
                              paged=meta).logits

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture (lazy initialisation, cuBLAS handles)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = step()
        self._graphs[(b, w)] = captured = _Graph(graph, packed, logits)
        self.stats["graphs"] += 1
        log.info("engine: captured the decode step for batch %d, %d blocks", b, w)
        return captured

    def _accept_all(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Samples one token per row of ``logits`` [S, V] and hands it to each request."""
        tokens = torch.argmax(logits, dim=-1).tolist()  # one device sync for every greedy row
        for i, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[i] = next_token(logits[i], seq.params, seq.gen)
            self._accept(seq, tokens[i])

    def _accept(self, seq: _Seq, tok: int) -> None:
        if tok in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.out.append(tok)
        self.stats["generated_tokens"] += 1
        text = self.tokenizer.decode(seq.out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for the next token
            piece = seq.stops.feed(text[len(seq.sent):])
            seq.sent = text
            if seq.stops.stopped:
                self._finish(seq, "stop", piece)
                return
            if piece and not self._emit(seq, Piece(piece, None, len(seq.out))):
                return
        if len(seq.out) >= seq.limit:
            self._finish(seq, "length")

    def _emit(self, seq: _Seq, piece: Piece) -> bool:
        try:
            seq.emit(piece)
            return True
        except Exception as exc:  # the consumer is gone: stop generating for it
            self._fail(seq, Unavailable(f"the client went away: {exc}"))
            return False

    def _release(self, seq: _Seq) -> None:
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.blocks:
            self.pool.allocator.give(seq.blocks)
            seq.blocks = []

    def _finish(self, seq: _Seq, reason: str, last: str | None = None) -> None:
        self._release(seq)
        if last is None:
            tail = self.tokenizer.decode(seq.out, skip_special_tokens=True)[len(seq.sent):] if seq.out else ""
            last = seq.stops.feed(tail) + seq.stops.flush()
            if seq.stops.stopped:
                reason = "stop"
        self._emit(seq, Piece(last, reason, len(seq.out)))
        seq.done.set()

    def _fail(self, seq: _Seq, error: BaseException) -> None:
        self._release(seq)
        seq.error = error
        seq.done.set()

