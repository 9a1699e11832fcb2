"""The rules that depend on the model, not on the tokenizer: context length, vocabulary, chat template.

The gateway knows a function's limits from the metadata recorded for its revision
(``Function.model``); the model server knows its own (its engine's context, its tokenizer's
size). Both check a request with the same functions, so a request that cannot fit is refused
with the same words wherever it is refused first. 0 means unknown: that limit is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from snapwake.errors import InvalidArgument
from snapwake.v1 import types_pb2

__all__ = ["ModelLimits", "check_length", "check_token_ids"]


@dataclass(frozen=True)
class ModelLimits:
    """What one request must fit in."""

    max_context_tokens: int = 0
    """Prompt plus completion tokens; 0: unknown."""
    vocab_size: int = 0
    """Token ids are below it; 0: unknown."""
    has_chat_template: bool = True
    """Whether the tokenizer has a chat template (tools need one to be rendered)."""
    embedding_size: int = 0
    """An embedding model's vector size; 0: a generative model (no /v1/embeddings)."""
    matryoshka: bool = False
    """Whether an embedding model takes any ``dimensions`` up to ``embedding_size``."""

    @classmethod
    def from_proto(cls, meta: types_pb2.ModelMetadata) -> ModelLimits:
        return cls(meta.max_context_tokens, meta.vocab_size, meta.has_chat_template, meta.embedding_size,
                   meta.matryoshka)


def check_length(prompt_tokens: int, max_tokens: int | None, max_context: int, field: str,
                 max_tokens_field: str = "max_tokens") -> None:
    """A prompt of ``prompt_tokens`` (in ``field``) plus up to ``max_tokens`` new tokens must fit
    ``max_context`` (0: unknown, not checked)."""
    if not prompt_tokens:
        raise InvalidArgument(f"{field}: empty after tokenization", field=field)
    if not max_context:
        return
    if prompt_tokens >= max_context:
        raise InvalidArgument(f"{field}: {prompt_tokens} tokens do not fit the context of {max_context}", field=field)
    if max_tokens is not None and prompt_tokens + max_tokens > max_context:
        raise InvalidArgument(f"{max_tokens_field}: {prompt_tokens} prompt tokens + {max_tokens} new tokens "
                              f"exceed the context of {max_context}", field=max_tokens_field)


def check_token_ids(ids: Iterable[int], vocab_size: int, field: str) -> None:
    """Every id must be one the model knows (``vocab_size`` 0: unknown, not checked)."""
    if vocab_size and any(t >= vocab_size for t in ids):
        raise InvalidArgument(f"{field}: token ids must be in [0, {vocab_size})", field=field)
