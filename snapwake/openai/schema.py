"""OpenAI request bodies, with every rule the built-in model server applies.

The gateway validates a built-in function's request with these models before it claims an
instance; the model server validates with them again (it can be called directly) and then
checks what needs its tokenizer. A bad field is an ``InvalidArgument``: its ``field`` is the
field's path up to any union member (``messages.0.content``), its message starts with the full
path (``messages.0.content.0.type: Input should be 'text'``). Types are strict: ``"max_tokens":
"5"`` is refused, not converted; an integer is a fine number. Rules across fields raise
``InvalidArgument`` themselves from a model validator (pydantic lets exceptions other than
``ValueError`` through).

Every field a request may carry is named here, and is either honoured by the model server or
refused with a 400 naming it: nothing is silently ignored. A field not named here is refused as
OpenAI refuses it ("Unrecognized request argument supplied"). ``user``, ``metadata``, ``store``,
``parallel_tool_calls`` and ``service_tier``, which common clients send, are documented no-ops.
The extra fields vLLM takes (``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``,
``chat_template_kwargs``) are honoured the way vLLM honours them.

    OpenAIRequest                 model, user
     +-- GenerationRequest        the sampling fields of both completions endpoints
     |    +-- ChatCompletionRequest   POST /v1/chat/completions
     |    +-- CompletionRequest       POST /v1/completions
     +-- ResponsesRequest         POST /v1/responses (text in and out)
     +-- EmbeddingRequest         POST /v1/embeddings (embedding models only: ``check_serves``)
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
    "MAX_JSON_DEPTH", "MAX_LOGIT_BIAS", "MAX_N", "MAX_STOPS", "MAX_TOP_LOGPROBS", "MODEL_SERVER_PATHS", "SCHEMAS", "ChatCompletionRequest", "ChatMessage",
    "CompletionRequest", "EMBEDDING_PATHS", "EmbeddingRequest", "GenerationRequest", "MAX_EMBEDDING_INPUTS", "ModelName",
    "OpenAIRequest", "ResponsesRequest", "check_serves", "json_depth",
    "parse_body", "parse_json", "validate",
]

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)

MAX_STOPS = 4


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


MAX_N = 16
"""Choices per request (the gateway's ``max_n`` may cap it lower)."""
MAX_LOGIT_BIAS = 300
"""Entries of ``logit_bias`` (OpenAI's own cap)."""
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
"""``top_logprobs`` (chat) and ``logprobs`` (completions), as OpenAI and vLLM cap them."""


def _stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOPS:
        raise _unsupported(f"takes at most {MAX_STOPS} strings")
    if "" in stops:
        raise _unsupported("the strings must not be empty")
    return value


def _token_ids(bias: dict[str, float] | None) -> dict[str, float] | None:
    if bias is not None and len(bias) > MAX_LOGIT_BIAS:
        raise _unsupported(f"takes at most {MAX_LOGIT_BIAS} tokens")
    for key in bias or {}:
        if not key.isascii() or not key.isdigit():
            raise _unsupported(f"keys must be token ids, got {key!r}")
    return bias


# A model name: absent (per-function URLs fix the function by path) or a non-empty string.
ModelName = Annotated[str, Field(min_length=1)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class OpenAIRequest(_Strict):
    """Fields shared by every endpoint; an unknown one is refused."""

    model: ModelName = None  # first: the gateway reads it before it knows the function
    user: str | None = None
    """A no-op: the end user's id, for the caller's own records."""

    @property
    def streaming(self) -> bool:
        return False

    def check_limits(self, limits: ModelLimits) -> None:
        """The rules that need the model's limits (``snapwake.openai.limits``); none here."""


class StreamOptions(_Strict):
    include_usage: bool | None = None


_Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


class FunctionDef(_Strict):
    name: _Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: _Name


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: _Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]
# What a chat template gets besides the messages (``enable_thinking`` for Qwen3): scalars only.
TemplateKwargs = dict[Annotated[str, Field(min_length=1, max_length=64)], str | int | float | bool | None]


class GenerationRequest(OpenAIRequest):
    """The sampling fields of chat and text completions, with the model server's bounds."""

    # The max_tokens a request gets when it sets none (None: up to the context).
    default_max_tokens: ClassVar[int | None] = None

    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Annotated[str | list[str] | None, AfterValidator(_stops)] = None
    seed: Annotated[int, Field(ge=-(1 << 63), lt=1 << 64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]] | None,
                          AfterValidator(_token_ids)] = None
    # vLLM's extra sampling fields (-1 or 0: top_k off).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # Documented no-ops: common clients send them; nothing in the answer depends on them.
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None

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
        check_token_ids(self.stop_token_ids or (), limits.vocab_size, "stop_token_ids")

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's logprob entry lists; None: no logprobs."""
        return None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


def _none_only(value: object) -> object:
    if value is not None:
        raise _unsupported("not supported by the built-in model server")
    return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or a list of text parts ({"type": "text", "text": ...}); no images or audio.
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant's earlier tool calls, rendered by the chat template."""
    tool_call_id: str | None = None
    # What the openai client sends back of an earlier answer: no-ops (the first two) or null.
    refusal: str | None = None
    annotations: list[Any] | None = None
    reasoning_content: str | None = None
    audio: Annotated[Any, AfterValidator(_none_only)] = None
    function_call: Annotated[Any, AfterValidator(_none_only)] = None

    def plain(self) -> dict[str, Any]:
        """The message as chat templates expect it (``developer`` is a ``system`` message)."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(raw: str) -> Any:
    """A tool call's arguments as templates expect them (an object; the string if not JSON)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    """A no-op: the model decides how many calls it makes."""
    chat_template_kwargs: TemplateKwargs | None = None

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs: only allowed with logprobs=true", field="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise InvalidArgument("tool_choice: needs tools", field="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or ()}:
                raise InvalidArgument(f"tool_choice: no tool named {name!r} in tools", field="tool_choice")
        if self.tools and self.tool_choice not in (None, "none") and self.response_format is not None \
                and self.response_format.type != "text":
            raise InvalidArgument("response_format: only text with tools", field="response_format")
        return self

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_limits(self, limits: ModelLimits) -> None:
        super().check_limits(limits)
        if self.tools and not limits.has_chat_template:
            raise InvalidArgument("tools: this model has no chat template to render them", field="tools")


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
    """``POST /v1/completions``: one prompt; ``echo``, ``best_of`` and ``suffix`` are refused
    (the model server has none of them)."""

    default_max_tokens: ClassVar[int | None] = 16  # what the OpenAI completions API defaults to

    prompt: Annotated[_Text | _TokenIds, BeforeValidator(_one_prompt)]
    echo: Annotated[bool | None, _not_supported((None, False))] = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[Annotated[int, Field(ge=1)] | None, _not_supported((None, 1))] = None
    suffix: Annotated[str | None, _not_supported()] = None

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def check_limits(self, limits: ModelLimits) -> None:
        super().check_limits(limits)
        if isinstance(self.prompt, list):  # token ids: counted without a tokenizer
            check_token_ids(self.prompt, limits.vocab_size, "prompt")
            check_length(len(self.prompt), self.max_new_tokens, limits.max_context_tokens, "prompt",
                         self.max_tokens_field)


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormatOptions(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIRequest):
    """``POST /v1/responses``: the Responses API for text in and text out. Tools, reasoning
    options, stored conversations and structured output there are refused (not named here)."""

    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool | None = None
    text: TextFormatOptions | None = None
    # Documented no-ops.
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages (``instructions`` first, as a system message)."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        return [*out, *(m.plain() for m in self.input)]

    def check_limits(self, limits: ModelLimits) -> None:
        new, ctx = self.max_output_tokens, limits.max_context_tokens
        if ctx and new is not None and new >= ctx:
            raise InvalidArgument(f"max_output_tokens: {new} leaves no room for a prompt in the context of {ctx} "
                                  "tokens", field="max_output_tokens")


MAX_EMBEDDING_INPUTS = 2048
"""Inputs of one ``/v1/embeddings`` request (OpenAI's own cap)."""

_EmbeddingText = Annotated[str, Field(min_length=1)]


class EmbeddingRequest(OpenAIRequest):
    """``POST /v1/embeddings``: one input or a batch (strings, or token ids), as floats or base64
    (little-endian float32, as OpenAI sends them); ``dimensions`` only for a model trained for
    shorter vectors (Matryoshka), as vLLM takes it."""

    input: (_EmbeddingText | Annotated[list[_EmbeddingText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | _TokenIds | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None

    def inputs(self) -> list[str | list[int]]:
        """Every input of the batch (a string, or token ids)."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(x, int) for x in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]

    def check_limits(self, limits: ModelLimits) -> None:
        size = limits.embedding_size
        if size and self.dimensions is not None:
            if self.dimensions > size:
                raise InvalidArgument(f"dimensions: {self.dimensions} is more than this model's {size}",
                                      field="dimensions")
            if not limits.matryoshka and self.dimensions != size:
                raise InvalidArgument(f"dimensions: this model makes {size}-dimensional vectors and was not trained "
                                      "for shorter ones (Matryoshka)", field="dimensions")
        for ids in self.inputs():
            if isinstance(ids, list):
                check_token_ids(ids, limits.vocab_size, "input")
                if limits.max_context_tokens and len(ids) > limits.max_context_tokens:
                    raise InvalidArgument(f"input: {len(ids)} tokens do not fit the context of "
                                          f"{limits.max_context_tokens}", field="input")


# Path -> the body it takes.
SCHEMAS: dict[str, type[OpenAIRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest,
}
# What the built-in model server serves (modelserver/openai/app.py).
MODEL_SERVER_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
EMBEDDING_PATHS = frozenset({"/v1/embeddings"})
"""What an embedding model serves; a generative model serves the rest of ``MODEL_SERVER_PATHS``."""


def check_serves(path: str, limits: ModelLimits, model: str) -> None:
    """InvalidArgument naming ``model`` when the model (embedding or generative) does not serve ``path``."""
    if limits.embedding_size and path not in EMBEDDING_PATHS:
        raise InvalidArgument(f"model: {model} is an embedding model; it serves /v1/embeddings only, not {path}",
                              field="model")
    if not limits.embedding_size and path in EMBEDDING_PATHS:
        raise InvalidArgument(f"model: {model} is not an embedding model; it does not serve {path}", field="model")

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
    if first["type"] == "extra_forbidden":  # OpenAI's own words for an unknown field
        return InvalidArgument(f"{path}: Unrecognized request argument supplied", field=field)
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
    return request


def parse_body(raw: bytes, kind: type[R]) -> tuple[R, dict[str, Any]]:
    """Validates a JSON body; returns the model and the body as parsed (forwarded unchanged)."""
    body = parse_json(raw)
    return validate(body, kind), body
