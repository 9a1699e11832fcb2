"""The model server's one lifecycle and the operations that move it.

    LOADING --> SERVING --> RELEASED --> LOADING (attach) --> SERVING ...
       \\--> FAILED         LOADING --> RELEASED (an attach that failed leaves nothing mapped)

One lock serialises phase changes. Requests do not hold it: they go to the engine, which
batches them (``modelserver.engine``); ``release`` closes the engine, which lets the requests in it
finish, before it unmaps the weights.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelserver import handover, manifest
from modelserver.arena import Arena
from modelserver.budget import kv_bytes_per_token, plan_slice
from modelserver.embedding import Embedder
from modelserver.engine import Engine, Piece
from modelserver.kvcache import BLOCK_SIZE, KVPool
from modelserver.manifest import TensorSpec
from modelserver.model import (
    Skeleton,
    bind,
    build_skeleton,
    fill_from_safetensors,
    generation_defaults,
    layout,
    read_model_config,
    unbind,
)
from modelserver.model import modelserver_config as make_modelserver_config
from modelserver.sampling import SamplingParams
from snapwake.errors import FailedPrecondition, InvalidArgument, StartFailed, Unavailable
from snapwake.modelsupport import Embedding, read_embedding

__all__ = ["Instance", "Phase", "Settings"]

log = logging.getLogger(__name__)

# The KV pool starts this big and doubles on demand up to what the slice allows.
INITIAL_KV_TOKENS = 4096


class Phase(enum.Enum):
    LOADING = "loading"    # weights are being read or attached; nothing is served
    SERVING = "serving"    # weights mapped; requests are answered
    RELEASED = "released"  # weights and KV freed (address range kept); waiting for attach
    FAILED = "failed"      # a load failed; the process should be replaced


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.LOADING: frozenset({Phase.SERVING, Phase.RELEASED, Phase.FAILED}),
    Phase.SERVING: frozenset({Phase.RELEASED}),
    Phase.RELEASED: frozenset({Phase.LOADING}),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Settings:
    """What an instance needs from the model server's configuration."""

    model_dir: Path
    handover_socket: str = ""
    dtype: str | None = None
    handover_timeout: float = 120.0
    # The GPU memory slice (0: none); see modelserver.budget.
    gpu_memory_bytes: int = 0
    # Requests decoded together at most (the scheduler's concurrency keeps below it).
    max_batch: int = 64
    cuda_graphs: bool = True
    # release also hands freed host memory back to the kernel (a standby's checkpoint is small).
    trim_on_release: bool = True


class Instance:
    """A model, its arena, and the phase machine around them."""

    def __init__(self, settings: Settings, arena: Arena, tokenizer: Any) -> None:
        self.settings = settings
        self.arena = arena
        self.tokenizer = tokenizer
        self.phase = Phase.LOADING
        self.lock = threading.Lock()
        self.skeleton: Skeleton | None = None
        self.specs: list[TensorSpec] = []
        self.arena_bytes = 0
        self.modelserver_config: dict[str, Any] = {}
        self.engine: Engine | None = None
        self.embedder: Embedder | None = None
        """Set instead of ``engine`` for an embedding model."""
        self.inflight = 0
        # The most requests ever in this process at once: lets tests check the scheduler's
        # concurrency limit from the instance's side, not from the scheduler's own books.
        self.inflight_peak = 0
        self.last_request_unix = 0.0
        # generation_config.json's sampling defaults, for requests that give none (vLLM's rule).
        self.generation_defaults: dict[str, Any] = generation_defaults(settings.model_dir)

    def _move(self, new: Phase) -> None:
        if new not in TRANSITIONS[self.phase]:
            raise FailedPrecondition(f"cannot go from {self.phase.value} to {new.value}")
        log.info("phase %s -> %s", self.phase.value, new.value)
        self.phase = new

    def _bind(self) -> None:
        assert self.skeleton is not None
        bind(self.skeleton, self.specs, self.arena.tensor())
        config = self.skeleton.config
        dtype_bytes = next(self.skeleton.model.parameters()).element_size()  # the KV cache's dtype too
        import torch

        gpu = getattr(self.arena, "ordinal", -1)
        if self.skeleton.embedding is not None:  # no KV pool, no token loop: the slice's rest is activations
            room = self.settings.gpu_memory_bytes - self.arena_bytes
            if self.settings.gpu_memory_bytes > 0 and gpu >= 0:
                if room <= 0:
                    raise StartFailed(f"gpu_memory_bytes: a slice of {self.settings.gpu_memory_bytes / 2**30:.2f} GiB "
                                      f"cannot hold the weights ({self.arena_bytes / 2**30:.2f} GiB)")
                total = torch.cuda.get_device_properties(gpu).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, room / total), gpu)
            self.embedder = Embedder(self.skeleton.model, self.skeleton.embedding,
                                     int(getattr(config, "max_position_embeddings", 0) or 0))
            log.info("embedding model: %d-dimensional vectors", self.skeleton.embedding.size)
            return
        free = torch.cuda.mem_get_info(gpu)[0] if gpu >= 0 else 0
        budget = plan_slice(self.settings.gpu_memory_bytes, self.arena_bytes,
                            kv_bytes_per_token(config, dtype_bytes),
                            int(getattr(config, "max_position_embeddings", 2048)), free)
        if budget.allocator_bytes and gpu >= 0:
            # The arena lives outside PyTorch's allocator; cap the allocator at the rest of the slice.
            total = torch.cuda.get_device_properties(gpu).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget.allocator_bytes / total), gpu)
        heads = config.num_attention_heads
        pool = KVPool(config.num_hidden_layers, max(1, budget.kv_tokens // BLOCK_SIZE),
                      getattr(config, "num_key_value_heads", None) or heads,
                      getattr(config, "head_dim", None) or config.hidden_size // heads,
                      self.skeleton.dtype, self.arena.tensor().device,
                      initial_blocks=INITIAL_KV_TOKENS // BLOCK_SIZE)
        max_context = min(budget.max_context, pool.tokens)
        self.engine = Engine(self.skeleton.model, self.tokenizer, eos_ids(self.settings.model_dir, config),
                             pool, max_context, max_batch=self.settings.max_batch,
                             cuda_graphs=self.settings.cuda_graphs)
        log.info("KV pool: up to %d tokens (%.1f MiB allocated now), context %d, batch up to %d", pool.tokens,
                 pool.nbytes / 2**20,
                 self.engine.max_context, self.settings.max_batch)

    def load_from_dir(self) -> dict[str, Any]:
        """Reads the checkpoint into a fresh arena (start modes load and snapshot)."""
        t0 = time.monotonic()
        with self.lock:
            try:
                model_config = read_model_config(self.settings.model_dir)
                embedding = read_embedding(self.settings.model_dir, model_config)
                self.skeleton = build_skeleton(model_config, self.settings.dtype, embedding)
                self.specs, self.arena_bytes = layout(self.skeleton)
                self.modelserver_config = make_modelserver_config(model_config, self.skeleton.dtype, embedding)
                self.arena.allocate(self.arena_bytes)
                fill_from_safetensors(self.settings.model_dir, self.specs, self.arena.tensor())
                self._bind()
            except BaseException:
                self._move(Phase.FAILED)
                raise
            self._move(Phase.SERVING)
        return {"ok": True, "bytes": self.arena_bytes, "seconds": time.monotonic() - t0}

    def attach(self, snapshot_id: str, gpu: int | None = None) -> dict[str, Any]:
        """Maps the snapshot's arena handed over by the blobstore and serves again."""
        if not snapshot_id:
            raise InvalidArgument("attach needs a snapshot_id", field="snapshot_id")
        t0 = time.monotonic()
        with self.lock:
            if self.phase is not Phase.LOADING:  # the first attach of standby starts in LOADING
                self._move(Phase.LOADING)
            try:
                reply = handover.load(self.settings.handover_socket, snapshot_id,
                                      self.arena.gpu if gpu is None else gpu, self._map,
                                      self.settings.handover_timeout)
            except BaseException:
                self._drop()
                self._move(Phase.RELEASED)
                raise
            self._move(Phase.SERVING)
        return {"ok": True, "bytes": self.arena_bytes, "seconds": time.monotonic() - t0,
                "dma_seconds": reply.get("dma_seconds", 0.0)}

    def _map(self, fd: int, reply: dict[str, Any]) -> None:
        specs, arena_bytes, modelserver_config = manifest.from_json(reply.get("manifest") or {})
        size = int(reply.get("alloc_bytes") or reply.get("bytes") or arena_bytes)
        if size < arena_bytes:
            raise InvalidArgument(f"handed-over memory ({size} B) is smaller than the arena ({arena_bytes} B)",
                                  field="alloc_bytes")
        if self.skeleton is None:  # standby: the manifest is the source of the skeleton config
            self.skeleton = build_skeleton(modelserver_config["model_config"], modelserver_config.get("dtype"),
                                           Embedding.from_json(modelserver_config.get("embedding")))
        self.specs, self.arena_bytes, self.modelserver_config = specs, arena_bytes, modelserver_config
        self.arena.attach(fd, size)
        self._bind()

    def _drop(self) -> None:
        if self.engine is not None:
            self.engine.close()  # requests in it finish first (bounded)
            self.engine.pool.free()
        self.engine = None
        self.embedder = None
        if self.skeleton is not None:
            unbind(self.skeleton)
        self.arena.release()

    def release(self) -> dict[str, Any]:
        """Frees weights and KV memory; waits for the request being served to finish."""
        t0 = time.monotonic()
        with self.lock:
            if self.phase is Phase.RELEASED:
                return {"ok": True, "seconds": 0.0}
            self._move(Phase.RELEASED)
            self._drop()
            if self.settings.trim_on_release:
                trim_host()
        return {"ok": True, "seconds": time.monotonic() - t0}

    def manifest_json(self, snapshot_id: str = "") -> dict[str, Any]:
        """The manifest of the arena as it is now."""
        msg = manifest.to_proto(self.specs, self.arena_bytes, self.modelserver_config, snapshot_id)
        return manifest.to_json(msg)

    def snapshot(self, snapshot_id: str) -> dict[str, Any]:
        """Hands the arena and its manifest to the blobstore (handover ``store``)."""
        if not snapshot_id:
            raise InvalidArgument("snapshot needs a snapshot_id", field="snapshot_id")
        t0 = time.monotonic()
        with self.lock:
            if self.phase is not Phase.SERVING:
                raise FailedPrecondition(f"cannot snapshot in phase {self.phase.value}")
            reply = handover.store(self.settings.handover_socket, snapshot_id, self.manifest_json(snapshot_id),
                                   self.arena.gpu, self.arena.export_fd(), self.settings.handover_timeout)
        return {"ok": True, "bytes": int(reply.get("bytes", self.arena_bytes)),
                "manifest_digest": reply.get("manifest_digest", ""), "seconds": time.monotonic() - t0}

    def status(self) -> dict[str, Any]:
        """The control socket's status reply."""
        import os

        engine = self.engine
        return {"ok": True, "phase": self.phase.value, "arena_bytes": self.arena_bytes if engine else 0,
                "pid": os.getpid(), "inflight": self.inflight,
                "inflight_peak": self.inflight_peak, "last_request_unix": self.last_request_unix,
                "kv_pool_tokens": engine.pool.tokens if engine else 0,
                "engine": dict(engine.stats) if engine else {}}

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            emit: Callable[[Piece], None]) -> None:
        """Generates one completion in the engine's batch, handing each piece to ``emit``."""
        with self.lock:
            engine = self.engine
            if self.phase is not Phase.SERVING or engine is None:
                raise Unavailable(f"the model is not serving (phase {self.phase.value})")
        engine.generate(prompt_ids, params, cancel, emit)


def trim_host() -> int:
    """Frees what released objects left behind in host memory: reference cycles, then the C
    heap's free pages (glibc ``malloc_trim``, every arena). Returns the objects collected."""
    import ctypes
    import gc

    collected = gc.collect()
    try:
        trimmed = bool(ctypes.CDLL(None).malloc_trim(0))  # the process's own symbols: its libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to trim
        trimmed = False
    log.info("release: %d objects collected; malloc_trim %s", collected, "returned memory" if trimmed else "no-op")
    return collected


def eos_ids(model_dir: Path, config: Any) -> set[int]:
    """End-of-sequence ids from generation_config.json, the model config and nothing else."""
    import json

    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None)]
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
