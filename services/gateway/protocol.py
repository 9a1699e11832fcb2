"""What the gateway checks of a request body before it claims an instance.

Every body must be a JSON object whose ``model`` names a function (``Routing``). What follows
depends on who serves that function:

- the built-in model server: the whole shared schema (``snapwake.openai``: every field is
  honoured or refused, an unknown one too), then the limits recorded for the function's
  revision (context length, vocabulary, chat template, embedding or generative model), so a
  request the model server would refuse is refused here, with its bytes, before a claim or a
  cold start: /v1/embeddings for a chat model, chat for an embedding model. Until a revision's
  metadata is recorded (its snapshot build or first start), that one is the model server's to
  refuse;
- a user image: only what the gateway uses itself (``stream``, to relay the answer); the body
  passes on unchanged and the image answers the rest.

The body is forwarded as it came.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from services.gateway.models import model_id_for
from services.gateway.scheduler_client import FunctionInfo
from snapwake import errors
from snapwake.openai import MODEL_SERVER_PATHS, SCHEMAS, ModelName, check_serves, validate

__all__ = ["Routing", "Streaming", "check_request"]


class Routing(BaseModel):
    """The function the body names (the schema's own type, so it fails with the same words)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: ModelName = None


class Streaming(Routing):
    """What the gateway reads of a body it otherwise passes on: whether to relay SSE."""

    stream: bool | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


def check_request(path: str, body: dict[str, object], fn: FunctionInfo) -> bool:
    """Checks ``body`` for ``path`` on ``fn``; returns whether the answer streams. Raises
    ``InvalidArgument`` naming the first bad field."""
    if not fn.builtin:
        return validate(body, Streaming).streaming
    if path not in MODEL_SERVER_PATHS:  # at once, whatever the body: no claim, no start
        raise errors.InvalidArgument(f"model: {model_id_for(fn.function_id)} is served by the built-in model "
                                     f"server, which does not serve {path}", field="model")
    if fn.limits is not None:  # at once too: an embedding model's chat, a chat model's embeddings
        check_serves(path, fn.limits, model_id_for(fn.function_id))
    request = validate(body, SCHEMAS[path])
    if fn.limits is not None:
        request.check_limits(fn.limits)
    return request.streaming
