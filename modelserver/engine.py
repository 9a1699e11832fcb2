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

On CUDA, decode steps replay CUDA graphs (``modelserver.graphs``: one per batch and
block-table width bucket, captured the second time a bucket is needed); a step without a graph
runs eagerly. The graphs are dropped when the KV pool grows and when the engine closes, so a
parked instance holds no GPU memory for them.

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

from modelserver.graphs import DecodeGraphs, DecodeRow
from modelserver.kvcache import ATTN_IMPLEMENTATION, KVPool, StepMeta, blocks_for, register
from modelserver.sampling import SamplingParams
from modelserver.stops import StopFilter
from snapwake.errors import ResourceExhausted, SnapwakeError, Unavailable

__all__ = ["Engine", "Piece", "next_token"]

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
    scaled = logits.float() / params.temperature
    if not bool(torch.isfinite(scaled).all()):
        # A temperature so small (1e-38) that the logits overflow: sampling at it is greedy.
        return int(torch.argmax(logits))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        drop[0] = False  # a top_p below float32's least value (5e-324) compares as 0
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))


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
        config: Any = model.config
        config._attn_implementation = ATTN_IMPLEMENTATION
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pool = pool
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self._device = next(model.parameters()).device
        self.graphs = DecodeGraphs(model, pool, self._device, cuda_graphs)
        self.max_context = min(max_context, (pool.max_blocks - self.graphs.reserved_blocks) * pool.block_size)
        self._cv = threading.Condition()
        self._inbox: list[_Seq] = []
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._closed = False
        self._fatal: BaseException | None = None
        self._order = 0
        self._stats = {"steps": 0, "batch_peak": 0, "preempted": 0, "generated_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # --- the callers' side ------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the engine started (the control socket's ``status`` shows them)."""
        return {**self._stats, "graphs": self.graphs.captured, "graph_steps": self.graphs.replays}

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
            self.graphs.drop()  # closing: the graphs' memory goes with the KV pool
        except BaseException as exc:  # a bug: fail everything now and every later request
            log.exception("engine thread failed")
            with self._cv:
                self._fatal = exc
                seqs = [*self._inbox, *self._waiting, *self._running]
                self._inbox.clear()
                self._waiting.clear()
                self._running.clear()
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
        self._stats["steps"] += 1

    def _guarded(self, seqs: list[_Seq], fn: Callable[[list[_Seq]], None]) -> None:
        """Runs a forward step; if it fails, the requests in it fail and the engine goes on."""
        try:
            try:
                fn(seqs)
            except torch.OutOfMemoryError:
                # The graphs' memory pool may have taken the room: without them, retry the step
                # (a step changes nothing before its forward has run).
                if not self.graphs.on_out_of_memory():
                    raise
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
        self.graphs.drop()
        grown = self.pool.grow()
        log.info("engine: KV pool %s to %d blocks (budget %d)", "grew" if grown else "could not grow",
                 self.pool.allocator.num_blocks, self.pool.max_blocks)
        return grown

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self.pool.allocator.give(seq.blocks)
        seq.blocks, seq.kv_len = [], 0
        self._waiting.appendleft(seq)
        self._stats["preempted"] += 1
        log.info("engine: preempted a request of %d tokens (KV pool full)", len(seq.tokens))

    def _decode(self, _: list[_Seq]) -> None:
        self._make_room()
        seqs = list(self._running)
        if not seqs:
            return
        rows = [DecodeRow(s.out[-1], s.kv_len, self._slot(s, s.kv_len), s.blocks) for s in seqs]
        logits = self.graphs.decode(rows)
        if logits is None:
            logits = self._decode_eager(rows)
        for seq in seqs:
            seq.kv_len += 1
        self._stats["batch_peak"] = max(self._stats["batch_peak"], len(seqs))
        self._accept_all(seqs, logits)

    def _decode_eager(self, rows: list[DecodeRow]) -> torch.Tensor:
        """The decode step as plain forward calls: logits ``[len(rows), V]``."""
        dev = self._device
        width = max(len(r.blocks) for r in rows)
        table = [r.blocks + [0] * (width - len(r.blocks)) for r in rows]
        meta = StepMeta(self.pool, torch.tensor([r.slot for r in rows], device=dev),
                        prefill=False, block_table=torch.tensor(table, device=dev),
                        seq_lens=torch.tensor([r.position + 1 for r in rows], device=dev))
        logits: torch.Tensor = self.model(input_ids=torch.tensor([[r.token for r in rows]], device=dev),
                                          position_ids=torch.tensor([[r.position for r in rows]], device=dev),
                                          use_cache=False, logits_to_keep=0, paged=meta).logits[0]
        return logits

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
        self._stats["generated_tokens"] += 1
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

