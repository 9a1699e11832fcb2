"""Request bodies -> prompt token ids and sampling params. Every bad field raises
``InvalidArgument`` naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelserver.sampling import SamplingParams, parse_sampling
from snapwake.errors import InvalidArgument

__all__ = ["Prepared", "prepare_chat", "prepare_completion", "chat_messages"]

ROLES = {"system", "developer", "user", "assistant", "tool"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # what the OpenAI completions API defaults to


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model is required and must be a string", field="model")
    return model


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported", field="messages")
            parts.append(part["text"])
        return "".join(parts)
    if value is None:
        return ""
    raise InvalidArgument(f"messages[{i}].content must be a string or a list of text parts", field="messages")


def chat_messages(value: Any) -> list[dict[str, str]]:
    """Validated messages in the plain form chat templates expect."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument("messages must be a non-empty list", field="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {sorted(ROLES)}", field="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _check_length(prompt_ids: list[int], params: SamplingParams, max_context: int, field: str) -> None:
    if not prompt_ids:
        raise InvalidArgument(f"{field} is empty after tokenization", field=field)
    if len(prompt_ids) >= max_context:
        raise InvalidArgument(f"{field} has {len(prompt_ids)} tokens; the context is {max_context}", field=field)
    if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_context:
        raise InvalidArgument(f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                              f"context of {max_context}", field="max_tokens")


def prepare_chat(body: dict[str, Any], tokenizer: Any, max_context: int) -> Prepared:
    """Validates a chat completion request and applies the tokenizer's chat template."""
    model = _model(body)
    messages = chat_messages(body.get("messages"))
    params = parse_sampling(body, None)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a model with no template: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    _check_length(ids, params, max_context, "messages")
    return Prepared(model, ids, params)


def prepare_completion(body: dict[str, Any], tokenizer: Any, max_context: int) -> Prepared:
    """Validates a text completion request (one prompt: a string or token ids)."""
    model = _model(body)
    for field in ("echo", "logprobs", "best_of", "suffix"):
        if body.get(field) not in (None, False, 1 if field == "best_of" else None):
            raise InvalidArgument(f"{field} is not supported", field=field)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})", field="prompt")
        ids = list(prompt)
    else:
        raise InvalidArgument("prompt must be a string, a list of token ids, or a list with one of those",
                              field="prompt")
    params = parse_sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
    _check_length(ids, params, max_context, "prompt")
    return Prepared(model, ids, params)
