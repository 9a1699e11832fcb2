"""``POST /v1/embeddings`` on an embedding model: validate, tokenize, embed, shape the answer.

Strings are tokenized as the model's own tokenizer does for a single text (its special tokens
included: Qwen3-Embedding's tokenizer appends the end-of-text token its pooling reads); token
ids are taken as they are. ``encoding_format`` ``base64`` is each vector's little-endian float32
bytes, as OpenAI sends them (the openai client asks for it by default and decodes it).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from modelserver.embedding import Embedder, shorten
from modelserver.metrics import ServerMetrics
from snapwake.errors import InvalidArgument
from snapwake.openai import EmbeddingRequest, ModelLimits
from snapwake.openai import validate as validate_body

__all__ = ["embed"]


def _tokens(request: EmbeddingRequest, tokenizer: Any, max_context: int) -> list[list[int]]:
    out: list[list[int]] = []
    items = request.inputs()
    for i, item in enumerate(items):
        ids = list(tokenizer(item)["input_ids"]) if isinstance(item, str) else item
        field = f"input.{i}" if len(items) > 1 else "input"
        if not ids:
            raise InvalidArgument(f"{field}: empty after tokenization", field="input")
        if max_context and len(ids) > max_context:
            raise InvalidArgument(f"{field}: {len(ids)} tokens do not fit the context of {max_context}",
                                  field="input")
        out.append(ids)
    return out


async def embed(body: dict[str, Any], embedder: Embedder, tokenizer: Any, limits: ModelLimits,
                metrics: ServerMetrics | None = None) -> dict[str, Any]:
    """The answer to one embeddings request (InvalidArgument naming a bad field)."""
    request = validate_body(body, EmbeddingRequest)
    if request.model is None:  # the gateway always sends one
        raise InvalidArgument("model: field required", field="model")
    request.check_limits(limits)
    ids = _tokens(request, tokenizer, limits.max_context_tokens)
    vectors = await asyncio.to_thread(embedder.embed, ids)
    vectors = shorten(vectors, request.dimensions, embedder.embedding.normalize)
    tokens = sum(map(len, ids))
    if metrics is not None:
        metrics.prompt_tokens.inc(tokens)
        metrics.requests.labels("embedding").inc()
    data = []
    for index, row in enumerate(vectors):
        if request.encoding_format == "base64":
            value: Any = base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            value = row.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


