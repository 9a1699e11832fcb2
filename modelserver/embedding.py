"""Embeddings of a decoder embedding model (Qwen3-Embedding-shaped): the final hidden state of
each input's last token, L2-normalised.

The model is transformers' bare decoder (``AutoModel``: no LM head), bound to the arena like a
generative model; there is no KV pool and no token loop. One request's inputs run as a few
padded batches (right padding, so every input keeps its own positions and its last real token
sees exactly its own tokens), each of at most ``token_budget`` padded tokens; one lock runs one
batch at a time.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from snapwake.modelsupport import Embedding

__all__ = ["Embedder", "shorten"]


class Embedder:
    """Embeds token id sequences with a bound bare decoder."""

    def __init__(self, model: torch.nn.Module, embedding: Embedding, max_context: int,
                 token_budget: int = 8192) -> None:
        config: Any = model.config
        config._attn_implementation = "sdpa"  # a plain padded forward: transformers' own attention
        self.model = model
        self.embedding = embedding
        self.max_context = max_context
        self.token_budget = token_budget
        self._device = next(model.parameters()).device
        self._lock = threading.Lock()

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """``[len(inputs), size]`` float32 vectors on the CPU, normalised if the model normalises."""
        out = torch.empty(len(inputs), self.embedding.size, dtype=torch.float32)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        start = 0
        while start < len(order):
            end = start + 1  # longest last: a batch's padded size is its last input's length times its count
            while end < len(order) and len(inputs[order[end]]) * (end + 1 - start) <= self.token_budget:
                end += 1
            batch = [inputs[i] for i in order[start:end]]
            out[order[start:end]] = self._forward(batch)
            start = end
        if self.embedding.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        last = torch.tensor([len(seq) - 1 for seq in batch])
        with self._lock, torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                use_cache=False).last_hidden_state
            return hidden[torch.arange(len(batch), device=hidden.device), last.to(hidden.device)].float().cpu()


def shorten(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka vectors cut to ``dimensions`` (None: as they are), normalised again."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    cut = vectors[:, :dimensions]
    return torch.nn.functional.normalize(cut, dim=-1) if normalize else cut
