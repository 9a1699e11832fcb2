"""Request bodies -> prompt token ids and sampling params. Every bad field raises
``InvalidArgument`` naming it.

The body is checked with the shared schema and this instance's limits (``snapwake.openai``,
the same rules the gateway applied before it claimed this instance); what needs the tokenizer,
the prompt's length in tokens, is checked here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from modelserver import tools as toolcalls
from modelserver.grammar import Grammars
from modelserver.reasoning import is_reasoning_template, opened_in_prompt
from modelserver.sampling import SamplingParams, from_request
from snapwake.errors import InvalidArgument
from snapwake.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelLimits,
    check_length,
)
from snapwake.openai import validate as validate_body

__all__ = ["Prepared", "prepare_chat", "prepare_completion"]

G = TypeVar("G", bound=GenerationRequest)


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    tools: toolcalls.ToolMode | None = None
    """Set when the answer is read for tool calls."""
    reasoning: bool | None = None
    """Set for a reasoning model (``<think>``): whether the prompt left the block open."""


def _checked(body: dict[str, Any], kind: type[G], tokenizer: Any, max_context: int) -> tuple[G, str]:
    """The request, checked as the gateway checks it (with this instance's limits), and its model."""
    request = validate_body(body, kind)
    if request.model is None:  # the gateway always sends one
        raise InvalidArgument("model: field required", field="model")
    request.check_limits(ModelLimits(max_context, len(tokenizer), bool(getattr(tokenizer, "chat_template", None))))
    return request, request.model


def _prepared(request: GenerationRequest, model: str, ids: list[int], max_context: int, field: str) -> Prepared:
    check_length(len(ids), request.max_new_tokens, max_context, field, request.max_tokens_field)
    return Prepared(model, ids, from_request(request))


def prepare_chat(body: dict[str, Any], tokenizer: Any, max_context: int, grammars: Grammars | None = None) -> Prepared:
    """Validates a chat completion request, applies the tokenizer's chat template and compiles its
    ``response_format`` (with ``grammars``; a worker thread's job: it can take a while)."""
    request, model = _checked(body, ChatCompletionRequest, tokenizer, max_context)
    fmt = request.response_format
    grammar = None
    if fmt is not None and fmt.type != "text":
        if grammars is None:
            raise InvalidArgument("response_format: structured output is not available here", field="response_format")
        grammar = grammars.compile(fmt)
    messages = [m.plain() for m in request.messages]
    template = getattr(tokenizer, "chat_template", None)
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in request.tools or ()]
    mode = None
    if tools and request.tool_choice != "none":
        choice = request.tool_choice
        forced = choice == "required" or not isinstance(choice, str | None)
        mode = toolcalls.ToolMode(toolcalls.family_of(template), forced)
        if forced:
            if grammars is None:
                raise InvalidArgument("tool_choice: forcing a call is not available here", field="tool_choice")
            name = None if isinstance(choice, str) else choice.function.name  # type: ignore[union-attr]
            grammar = grammars.compile_schema(toolcalls.forced_schema(tools, name), "tools")
    if template:
        # The template gets chat_template_kwargs (enable_thinking, ...) as vLLM passes them.
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        for reserved in ("messages", "tools", "add_generation_prompt", "tokenize", "conversation"):
            kwargs.pop(reserved, None)
        if mode is not None:
            if toolcalls.renders_tools(template):
                kwargs["tools"] = tools
            else:  # the template would drop them: say what they are in a system message
                messages = [toolcalls.fallback_system_message(tools), *messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    else:  # a model with no template: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prepared = _prepared(request, model, ids, max_context, "messages")
    if grammar is not None:
        prepared = dataclasses.replace(prepared, params=dataclasses.replace(prepared.params, grammar=grammar))
    reasoning = opened_in_prompt(text) if is_reasoning_template(template) else None
    return dataclasses.replace(prepared, tools=mode, reasoning=reasoning)


def prepare_completion(body: dict[str, Any], tokenizer: Any, max_context: int) -> Prepared:
    """Validates a text completion request (one prompt: a string or token ids)."""
    request, model = _checked(body, CompletionRequest, tokenizer, max_context)
    prompt = request.prompt
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if isinstance(prompt, str) else list(prompt)
    return _prepared(request, model, ids, max_context, "prompt")
