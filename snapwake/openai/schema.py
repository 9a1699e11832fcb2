"""OpenAI request bodies, with every rule the built-in model server applies.

The gateway validates a built-in function's request with these models before it claims an
instance; the model server validates with them again (it can be called directly) and then
checks what needs its tokenizer. A bad field is an ``InvalidArgument``: its ``field`` is the
field's path up to any union member (``messages.0.content``), its message starts with the full
path (``messages.0.content.0.type: Input should be 'text'``). Types are strict: ``"max_tokens":
"5"`` is refused, not converted; an integer is a fine number. Rules across fields raise
``InvalidArgument`` themselves from a model validator (pydantic lets exceptions other than
``ValueError`` through). Fields not named here are accepted, logged and passed on unchanged.

    OpenAIRequest                 model, user
     +-- GenerationRequest        the sampling fields of both completions endpoints
     |    +-- ChatCompletionRequest   POST /v1/chat/completions
     |    +-- CompletionRequest       POST /v1/completions
     +-- EmbeddingRequest         POST /v1/embeddings (not served by the built-in model server)
"""

from __future__ import annotations

import json
import logging
import re
from itertools import accumulate
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from snapwake.errors import InvalidArgument
from snapwake.openai.limits import ModelLimits, check_length, check_token_ids

__all__ = [
    "MAX_JSON_DEPTH", "MAX_STOPS", "MODEL_SERVER_PATHS", "SCHEMAS", "ChatCompletionRequest", "ChatMessage",
    "CompletionRequest", "EmbeddingRequest", "GenerationRequest", "ModelName", "OpenAIRequest", "json_depth",
    "parse_body", "parse_json", "validate",
]

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)

MAX_STOPS = 4


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


def _only_one(n: int) -> int:
    if n != 1:
        raise _unsupported("only n=1 is supported")
    return n


def _stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOPS:
        raise _unsupported(f"takes at most {MAX_STOPS} strings")
    if "" in stops:
        raise _unsupported("the strings must not be empty")
    return value


def _token_ids(bias: dict[str, float] | None) -> dict[str, float] | None:
    for key in bias or {}:
        if not key.isascii() or not key.isdigit():
            raise _unsupported(f"keys must be token ids, got {key!r}")
    return bias


# A model name: absent (per-function URLs fix the function by path) or a non-empty string.
ModelName = Annotated[str, Field(min_length=1)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class OpenAIRequest(_Strict):
    """Fields shared by every endpoint; unknown ones are kept in ``model_extra``."""

    model: ModelName = None  # first: the gateway reads it before it knows the function
    user: str | None = None

    @property
    def streaming(self) -> bool:
        return False

    def check_limits(self, limits: ModelLimits) -> None:
        """The rules that need the model's limits (``snapwake.openai.limits``); none here."""


class StreamOptions(_Strict):
    include_usage: bool | None = None


class GenerationRequest(OpenAIRequest):
    """The sampling fields of chat and text completions, with the model server's bounds."""

    # The max_tokens a request gets when it sets none (None: up to the context).
    default_max_tokens: ClassVar[int | None] = None

    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1), AfterValidator(_only_one)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Annotated[str | list[str] | None, AfterValidator(_stops)] = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]] | None,
                          AfterValidator(_token_ids)] = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options: only allowed with stream=true", field="stream_options")
        return self

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def max_tokens_field(self) -> str:
        """The field that sets the completion's length (``max_completion_tokens`` wins)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def max_new_tokens(self) -> int | None:
        """Cap on generated tokens: the request's, else the endpoint's default (None: the context)."""
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return given if given is not None else self.default_max_tokens

    def check_limits(self, limits: ModelLimits) -> None:
        new, ctx = self.max_new_tokens, limits.max_context_tokens
        if ctx and new is not None and new >= ctx:  # every prompt has at least one token
            raise InvalidArgument(f"{self.max_tokens_field}: {new} leaves no room for a prompt in the "
                                  f"context of {ctx} tokens", field=self.max_tokens_field)
        check_token_ids((int(k) for k in self.logit_bias or {}), limits.vocab_size, "logit_bias")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or a list of text parts ({"type": "text", "text": ...}); no images or audio.
    content: str | list[TextPart] | None = None

    def plain(self) -> dict[str, str]:
        """The message as chat templates expect it (``developer`` is a ``system`` message)."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``. ``logprobs`` is accepted; the answer carries none."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | int | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None


_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _one_prompt(prompt: object) -> object:
    """A list holding one prompt (a string or token ids) is that prompt; more are refused."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > 1:
            raise _unsupported("only one prompt per request is supported")
        prompt = prompt[0]
    if prompt == []:
        raise _unsupported("must not be empty")
    return prompt


def _not_supported(allowed: tuple[object, ...] = (None,)) -> AfterValidator:
    def check(value: object) -> object:
        if value not in allowed:
            raise _unsupported("not supported by the built-in model server")
        return value
    return AfterValidator(check)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: one prompt; ``echo``, ``logprobs``, ``best_of`` and ``suffix``
    are refused (the model server has none of them)."""

    default_max_tokens: ClassVar[int | None] = 16  # what the OpenAI completions API defaults to

    prompt: Annotated[_Text | _TokenIds, BeforeValidator(_one_prompt)]
    echo: Annotated[bool | None, _not_supported((None, False))] = None
    logprobs: Annotated[bool | int | None, _not_supported((None, False, 0))] = None
    best_of: Annotated[Annotated[int, Field(ge=1)] | None, _not_supported((None, 1))] = None
    suffix: Annotated[str | None, _not_supported()] = None

    def check_limits(self, limits: ModelLimits) -> None:
        super().check_limits(limits)
        if isinstance(self.prompt, list):  # token ids: counted without a tokenizer
            check_token_ids(self.prompt, limits.vocab_size, "prompt")
            check_length(len(self.prompt), self.max_new_tokens, limits.max_context_tokens, "prompt",
                         self.max_tokens_field)


class EmbeddingRequest(OpenAIRequest):
    """``POST /v1/embeddings``."""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


# Path -> the body it takes.
SCHEMAS: dict[str, type[OpenAIRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
# What the built-in model server serves (modelserver/openai/app.py).
MODEL_SERVER_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

_TYPE_TAGS = frozenset({"str", "int", "bool", "float", "dict", "list", "none"})


def _is_tag(part: int | str) -> bool:
    """Whether a pydantic error location part names a union member, not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or "-" in part)


def _error(exc: ValidationError) -> InvalidArgument:
    """The first bad field, with the most specific of the errors pydantic found for it (each
    member of a union reports one; the deepest says most)."""
    found = exc.errors()
    field_loc = found[0]["loc"][:1]
    first = max((e for e in found if e["loc"][:1] == field_loc), key=lambda e: len(e["loc"]))
    loc = first["loc"]
    cut = next((i for i, part in enumerate(loc) if _is_tag(part)), len(loc))
    field = ".".join(str(p) for p in loc[:cut]) or "body"
    path = ".".join(str(p) for p in loc if not _is_tag(p)) or "body"
    return InvalidArgument(f"{path}: {first['msg']}", field=field)


# Deepest nesting of arrays and objects a body may have; an OpenAI body needs under ten levels
# (a tool's JSON schema a few more). Deeper bodies are refused before they are parsed.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``raw``'s arrays and objects, brackets inside strings aside.

    Without parsing (a parser recurses once per level): strings are cut out and the brackets
    left are summed, at C speed (regex, ``bytes.translate``, ``accumulate``)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def parse_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A request body as a JSON object; ``InvalidArgument`` naming ``body`` otherwise, a body
    nested deeper than ``max_depth`` included (never a ``RecursionError``)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_depth(data) > max_depth:
        raise InvalidArgument(f"request body: JSON nested deeper than {max_depth}", field="body")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}", field="body") from None
    except RecursionError:  # not reached after the depth check; kept so it can never be a 500
        raise InvalidArgument(f"request body: JSON nested deeper than {max_depth}", field="body") from None
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object", field="body")
    return body


def validate(body: dict[str, Any], kind: type[R]) -> R:
    """``body`` as a ``kind``; raises ``InvalidArgument`` naming the first bad field."""
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        raise _error(exc) from None
    if request.model_extra:
        log.info("passing on fields the schema does not check: %s", ", ".join(sorted(request.model_extra)))
    return request


def parse_body(raw: bytes, kind: type[R]) -> tuple[R, dict[str, Any]]:
    """Validates a JSON body; returns the model and the body as parsed (forwarded unchanged)."""
    body = parse_json(raw)
    return validate(body, kind), body
