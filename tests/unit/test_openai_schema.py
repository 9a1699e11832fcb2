"""The shared OpenAI schema (``snapwake.openai``): every rule of the built-in model server, as
tables; the model limits; the one error mapping."""

from __future__ import annotations

from typing import Any

import pytest

from snapwake import errors
from snapwake.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelLimits,
    OpenAIRequest,
    error_body,
    openai_error,
    parse_json,
    validate,
)
from snapwake.v1 import types_pb2

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT: dict[str, Any] = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(("kind", "base", "change", "field", "says"), [
    # The sampling fields, as the model server has always refused them.
    (ChatCompletionRequest, CHAT, {"n": 17}, "n", "less than or equal to 16"),
    (ChatCompletionRequest, CHAT, {"n": 0}, "n", "greater than or equal to 1"),
    (ChatCompletionRequest, CHAT, {"top_p": 0}, "top_p", "greater than 0"),
    (ChatCompletionRequest, CHAT, {"top_p": 1.01}, "top_p", "less than or equal to 1"),
    (ChatCompletionRequest, CHAT, {"temperature": 2.5}, "temperature", "less than or equal to 2"),
    (ChatCompletionRequest, CHAT, {"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    (ChatCompletionRequest, CHAT, {"temperature": True}, "temperature", "valid number"),
    (ChatCompletionRequest, CHAT, {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    (ChatCompletionRequest, CHAT, {"max_tokens": 5.0}, "max_tokens", "valid integer"),
    (ChatCompletionRequest, CHAT, {"max_completion_tokens": -1}, "max_completion_tokens", "greater than"),
    (ChatCompletionRequest, CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    (ChatCompletionRequest, CHAT, {"stop": ""}, "stop", "must not be empty"),
    (ChatCompletionRequest, CHAT, {"stop": ["a", ""]}, "stop", "must not be empty"),
    (ChatCompletionRequest, CHAT, {"stop": ["a", 1]}, "stop", "stop.1: Input should be a valid string"),
    (ChatCompletionRequest, CHAT, {"seed": 1.5}, "seed", "valid integer"),
    (ChatCompletionRequest, CHAT, {"seed": True}, "seed", "valid integer"),
    (ChatCompletionRequest, CHAT, {"stream": "yes"}, "stream", "valid boolean"),
    (ChatCompletionRequest, CHAT, {"stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    (ChatCompletionRequest, CHAT, {"stream": False, "stream_options": {}}, "stream_options", "stream=true"),
    (ChatCompletionRequest, CHAT, {"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    (ChatCompletionRequest, CHAT, {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    (ChatCompletionRequest, CHAT, {"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
    (ChatCompletionRequest, CHAT, {"logit_bias": {"7": 101}}, "logit_bias.7", "less than or equal to 100"),
    (ChatCompletionRequest, CHAT, {"model": ""}, "model", "at least 1 character"),
    # Chat messages.
    (ChatCompletionRequest, CHAT, {"messages": []}, "messages", "at least 1 item"),
    (ChatCompletionRequest, CHAT, {"messages": [{"role": "robot"}]}, "messages.0.role", "messages.0.role:"),
    (ChatCompletionRequest, CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", "messages.0.content.0.type: Input should be 'text'"),
    (ChatCompletionRequest, CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages.0.content", "messages.0.content.0.text:"),
    # Text completions: one prompt, and none of echo, logprobs, best_of, suffix.
    (CompletionRequest, TEXT, {"logprobs": 21}, "logprobs", "less than or equal to 20"),
    (CompletionRequest, TEXT, {"logprobs": True}, "logprobs", "valid integer"),
    # Every field is named in the schema: an unknown one is refused as OpenAI refuses it.
    (ChatCompletionRequest, CHAT, {"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    (CompletionRequest, TEXT, {"functions": []}, "functions", "Unrecognized request argument"),
    (ChatCompletionRequest, CHAT, {"messages": [{"role": "user", "content": "x", "x": 1}]}, "messages.0.x",
     "Unrecognized request argument"),
    (ChatCompletionRequest, CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats", "Unrecognized"),
    # Fields the engine honours, with their bounds.
    (ChatCompletionRequest, CHAT, {"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    (ChatCompletionRequest, CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    (ChatCompletionRequest, CHAT, {"logprobs": 1}, "logprobs", "valid boolean"),
    (ChatCompletionRequest, CHAT, {"top_k": -2}, "top_k", "greater than or equal to -1"),
    (ChatCompletionRequest, CHAT, {"min_p": 1.5}, "min_p", "less than or equal to 1"),
    (ChatCompletionRequest, CHAT, {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    (ChatCompletionRequest, CHAT, {"stop_token_ids": [-1]}, "stop_token_ids.0", "greater than or equal to 0"),
    (ChatCompletionRequest, CHAT, {"seed": 1 << 64}, "seed", "less than"),
    (ChatCompletionRequest, CHAT, {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    (ChatCompletionRequest, CHAT, {"service_tier": "cheap"}, "service_tier", "service_tier:"),
    (ChatCompletionRequest, CHAT, {"chat_template_kwargs": {"x": [1]}}, "chat_template_kwargs.x", "chat_template_kwargs.x"),
    # Tools and structured output: refused until the model server honours them.
    (ChatCompletionRequest, CHAT, {"tool_choice": "required"}, "tool_choice", "needs tools"),
    (ChatCompletionRequest, CHAT, {"response_format": {"type": "xml"}}, "response_format", "response_format"),
    (CompletionRequest, TEXT, {"echo": True}, "echo", "not supported"),
    (CompletionRequest, TEXT, {"best_of": 2}, "best_of", "not supported"),
    (CompletionRequest, TEXT, {"suffix": "!"}, "suffix", "not supported"),
    (CompletionRequest, TEXT, {"prompt": ["a", "b"]}, "prompt", "only one prompt"),
    (CompletionRequest, TEXT, {"prompt": [[1], [2]]}, "prompt", "only one prompt"),
    (CompletionRequest, TEXT, {"prompt": []}, "prompt", "must not be empty"),
    (CompletionRequest, TEXT, {"prompt": [[]]}, "prompt", "must not be empty"),
    (CompletionRequest, TEXT, {"prompt": ""}, "prompt", "at least 1 character"),
    (CompletionRequest, TEXT, {"prompt": [3, -1]}, "prompt", "prompt.1: Input should be greater than or equal to 0"),
    (CompletionRequest, TEXT, {"prompt": [1, True]}, "prompt", "prompt.1: Input should be a valid integer"),
    (CompletionRequest, {"model": "m"}, {}, "prompt", "Field required"),
])
def test_each_bad_field_is_named(kind: type[OpenAIRequest], base: dict[str, Any], change: dict[str, Any],
                                 field: str, says: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        validate({**base, **change}, kind)
    assert info.value.field == field
    assert info.value.message.startswith(field.split(".")[0]) and says in info.value.message


@pytest.mark.parametrize(("kind", "body", "want"), [
    (ChatCompletionRequest, CHAT, {"max_new_tokens": None, "streaming": False}),
    (ChatCompletionRequest, {**CHAT, "max_tokens": 5, "max_completion_tokens": 7},
     {"max_new_tokens": 7, "max_tokens_field": "max_completion_tokens"}),
    (ChatCompletionRequest, {**CHAT, "n": 1, "top_p": 1, "temperature": 0, "logprobs": True, "top_logprobs": 2},
     {"n": 1, "top_p": 1.0, "temperature": 0.0}),
    (ChatCompletionRequest, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, {"streaming": True}),
    (ChatCompletionRequest, {**CHAT, "stop": ["a", "b", "c", "d"], "logit_bias": {"5": -100}},
     {"stop": ["a", "b", "c", "d"]}),
    (CompletionRequest, TEXT, {"max_new_tokens": 16, "max_tokens_field": "max_tokens"}),
    (CompletionRequest, {**TEXT, "prompt": ["one"]}, {"prompt": "one"}),
    (CompletionRequest, {**TEXT, "prompt": [[1, 2]]}, {"prompt": [1, 2]}),
    (CompletionRequest, {**TEXT, "prompt": [0, 7], "max_tokens": 3}, {"prompt": [0, 7], "max_new_tokens": 3}),
    (CompletionRequest, {**TEXT, "echo": False, "logprobs": 0, "best_of": 1, "suffix": None}, {"echo": False}),
    (CompletionRequest, {**TEXT, "logprobs": 3, "n": 2}, {"top_logprobs_count": 3, "choices": 2}),
    (ChatCompletionRequest, {**CHAT, "logprobs": True}, {"top_logprobs_count": 0}),
    (ChatCompletionRequest, CHAT, {"top_logprobs_count": None, "choices": 1}),
    # The documented no-ops, as common clients send them.
    (ChatCompletionRequest, {**CHAT, "user": "u1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True,
                             "service_tier": "auto", "response_format": {"type": "text"}, "tool_choice": "none"},
     {"store": False}),
    # An assistant message as the openai client sends an earlier answer back.
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "assistant", "content": "a", "refusal": None,
                                                   "annotations": [], "audio": None, "function_call": None,
                                                   "tool_calls": None}]}, {"streaming": False}),
    (GenerationRequest, {}, {"model": None, "max_new_tokens": None}),
])
def test_good_bodies(kind: type[OpenAIRequest], body: dict[str, Any], want: dict[str, Any]) -> None:
    request = validate(body, kind)
    assert {k: getattr(request, k) for k in want} == want


def test_chat_messages_in_template_form() -> None:
    request = validate({**CHAT, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]}, ChatCompletionRequest)
    assert [m.plain() for m in request.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(("kind", "body", "limits", "field"), [
    (ChatCompletionRequest, {**CHAT, "max_tokens": 64}, ModelLimits(64, 100), "max_tokens"),
    (ChatCompletionRequest, {**CHAT, "max_tokens": 63}, ModelLimits(64, 100), None),
    (ChatCompletionRequest, {**CHAT, "max_completion_tokens": 64}, ModelLimits(64, 100), "max_completion_tokens"),
    (ChatCompletionRequest, {**CHAT, "max_tokens": 10**6}, ModelLimits(0, 100), None),  # context unknown
    (ChatCompletionRequest, {**CHAT, "logit_bias": {"100": 1}}, ModelLimits(64, 100), "logit_bias"),
    (ChatCompletionRequest, {**CHAT, "logit_bias": {"99": 1}}, ModelLimits(64, 100), None),
    (ChatCompletionRequest, {**CHAT, "logit_bias": {"10000": 1}}, ModelLimits(64, 0), None),  # vocabulary unknown
    (CompletionRequest, {**TEXT, "max_tokens": 20}, ModelLimits(16, 100), "max_tokens"),
    (CompletionRequest, TEXT, ModelLimits(16, 100), "max_tokens"),  # the default 16 leaves no room either
    (CompletionRequest, {**TEXT, "prompt": [1] * 48}, ModelLimits(64, 100), None),  # 48 + 16 = 64
    (CompletionRequest, {**TEXT, "prompt": [1] * 49}, ModelLimits(64, 100), "max_tokens"),
    (CompletionRequest, {**TEXT, "prompt": [1] * 64, "max_tokens": 1}, ModelLimits(64, 100), "prompt"),
    (CompletionRequest, {**TEXT, "prompt": [1, 100]}, ModelLimits(64, 100), "prompt"),
    (CompletionRequest, {**TEXT, "prompt": [1] * 60, "max_completion_tokens": 8}, ModelLimits(64, 100),
     "max_completion_tokens"),
    (CompletionRequest, {**TEXT, "prompt": "a long text " * 100}, ModelLimits(64, 100), None),  # needs a tokenizer
])
def test_model_limits(kind: type[OpenAIRequest], body: dict[str, Any], limits: ModelLimits,
                      field: str | None) -> None:
    request = validate(body, kind)
    if field is None:
        request.check_limits(limits)
        return
    with pytest.raises(errors.InvalidArgument) as info:
        request.check_limits(limits)
    assert info.value.field == field and info.value.message.startswith(field)


def test_limits_from_the_recorded_metadata() -> None:
    meta = types_pb2.ModelMetadata(max_context_tokens=8192, vocab_size=128256, has_chat_template=True)
    assert ModelLimits.from_proto(meta) == ModelLimits(8192, 128256)
    assert ModelLimits.from_proto(types_pb2.ModelMetadata()) == ModelLimits(0, 0, has_chat_template=False)


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_a_body_that_is_no_json_object_names_body(raw: bytes) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_json(raw)
    assert info.value.field == "body"


@pytest.mark.parametrize(("exc", "status", "body"), [
    (errors.InvalidArgument("n: only n=1 is supported", field="n"), 400,
     error_body("n: only n=1 is supported", "invalid_request_error", "n", "invalid_argument")),
    (errors.Unavailable("not serving"), 503, error_body("not serving", "service_unavailable", None, "unavailable")),
    (errors.NotFound("no such model", field="model"), 404,
     error_body("no such model", "not_found_error", "model", "model_not_found")),
    (RuntimeError("secret"), 500, error_body("internal error: RuntimeError", "server_error", None, "internal_error")),
])
def test_the_one_error_mapping(exc: BaseException, status: int, body: dict[str, Any]) -> None:
    assert openai_error(exc) == (status, body)
