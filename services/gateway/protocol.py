"""Request bodies the gateway validates before queueing them.

The gateway checks only what it needs and what would otherwise cost a cold start to find out
(types of the common fields); the instance's server does the rest. Fields it does not know are
accepted, logged and passed on unchanged. Types are strict: ``"max_tokens": "5"`` is a 400
naming ``max_tokens``, not a silent conversion.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapwake import errors

__all__ = ["ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "OpenAIRequest", "parse_body"]

log = logging.getLogger(__name__)


class OpenAIRequest(BaseModel):
    """Fields shared by every endpoint; unknown ones are kept in ``model_extra``."""

    model_config = ConfigDict(strict=True, extra="allow")

    # Optional here: per-function URLs fix the function by path. /v1/... requires it (serving).
    model: str | None = None
    user: str | None = None

    @property
    def streaming(self) -> bool:
        return False


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class _Generation(OpenAIRequest):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | int | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    # A string, or a list of content parts ({"type": "text", "text": ...}).
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0)


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None


class EmbeddingRequest(OpenAIRequest):
    """``POST /v1/embeddings`` (only functions whose server offers it answer it)."""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)


_TYPE_TAGS = frozenset({"str", "int", "bool", "float", "dict", "list", "none"})


def _field_of(error: dict[str, Any]) -> str:
    """The dotted field path of a pydantic error, without the union member tags it adds
    (``("stop", "list[str]")`` is field ``stop``)."""
    names: list[str] = []
    for part in error["loc"]:
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or "-" in part):
            break  # what follows indexes into one union member; the field is named already
        names.append(str(part))
    return ".".join(names) or "body"


def parse_body(raw: bytes, kind: type[OpenAIRequest]) -> tuple[OpenAIRequest, dict[str, Any]]:
    """Validates a JSON body; returns the model and the body as parsed (forwarded unchanged).

    Raises ``InvalidArgument`` naming the first bad field (``field="body"`` for bad JSON).
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"request body is not valid JSON: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise errors.InvalidArgument("request body must be a JSON object", field="body")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _field_of(dict(first))
        raise errors.InvalidArgument(f"{name}: {first['msg']}", field=name) from None
    if request.model_extra:
        log.info("passing on fields the gateway does not check: %s", ", ".join(sorted(request.model_extra)))
    return request, body
