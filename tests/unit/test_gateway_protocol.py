"""Request validation (the shared schema the gateway applies): each bad field is a 400 naming it;
unknown fields pass."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from services.gateway.protocol import check_request
from services.gateway.scheduler_client import FunctionInfo
from snapwake import errors
from snapwake.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelLimits,
    parse_body,
)
from snapwake.v1 import types_pb2

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("change", "field"), [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage"),
    ({"stream_options": 1}, "stream_options"),
    ({"stop": 5}, "stop"),
    ({"seed": "1"}, "seed"),
    ({"model": 3}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": None}, "messages"),
])
def test_bad_chat_field_is_named(change: dict[str, object], field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_body(json.dumps({**CHAT, **change}).encode(), ChatCompletionRequest)
    assert info.value.field == field
    assert info.value.http_status == 400


@pytest.mark.parametrize(("kind", "body", "field"), [
    (CompletionRequest, {"model": "m"}, "prompt"),
    (CompletionRequest, {"model": "m", "prompt": 5}, "prompt"),
    (CompletionRequest, {"model": "m", "prompt": "x", "echo": "no"}, "echo"),
    (EmbeddingRequest, {"model": "m"}, "input"),
    (EmbeddingRequest, {"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    (ChatCompletionRequest, {"model": "m"}, "messages"),
])
def test_bad_field_per_endpoint(kind: type, body: dict[str, object], field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_body(json.dumps(body).encode(), kind)
    assert info.value.field == field


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_malformed_body_names_body(raw: bytes) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_body(raw, ChatCompletionRequest)
    assert info.value.field == "body"


def test_unknown_fields_are_refused_naming_them() -> None:
    body = {**CHAT, "frobnicate": True, "stream": True, "stream_options": {"include_usage": True}}
    with pytest.raises(errors.InvalidArgument) as info:
        parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert info.value.field == "frobnicate" and "Unrecognized request argument" in info.value.message


@pytest.mark.parametrize(("body", "streaming"), [
    ({**CHAT}, False), ({**CHAT, "stream": False}, False), ({**CHAT, "stream": True}, True),
    ({**CHAT, "temperature": 1}, False),  # an int is a fine float
])
def test_valid_chat_bodies(body: dict[str, object], streaming: bool) -> None:
    request, _ = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert request.streaming is streaming


BUILTIN = FunctionInfo("acme/default/m", 8, 5.0, image="builtin", limits=ModelLimits(64, 100))
USER_IMAGE = FunctionInfo("acme/default/u", 8, 5.0, image="docker://registry.local/echo:1")
EMBEDDER = FunctionInfo("acme/default/e", 8, 5.0, image="builtin", limits=ModelLimits(64, 100, embedding_size=32))


@pytest.mark.parametrize(("fn", "change", "field"), [
    (EMBEDDER, {"input": ["a", "b"], "encoding_format": "base64"}, None),
    (EMBEDDER, {"input": [[1, 2], [99]], "dimensions": 32}, None),
    (EMBEDDER, {"input": "a", "dimensions": 16}, "dimensions"),  # not Matryoshka
    (replace(EMBEDDER, limits=ModelLimits(64, 100, embedding_size=32, matryoshka=True)),
     {"input": "a", "dimensions": 16}, None),
    (EMBEDDER, {"input": "a", "dimensions": 33}, "dimensions"),
    (EMBEDDER, {"input": [[1, 100]]}, "input"),  # the recorded vocabulary
    (EMBEDDER, {"input": [1] * 65}, "input"),  # the recorded context
    (EMBEDDER, {"input": ["a"] * 2049}, "input"),
    (EMBEDDER, {"input": ["a", ""]}, "input"),
    (EMBEDDER, {"input": "a", "messages": []}, "messages"),
    (replace(EMBEDDER, limits=None), {"input": "a"}, None),  # nothing recorded yet: the model server decides
])
def test_embedding_requests(fn: FunctionInfo, change: dict[str, object], field: str | None) -> None:
    body = {"model": "e", **change}
    if field is None:
        assert check_request("/v1/embeddings", body, fn) is False
        return
    with pytest.raises(errors.InvalidArgument) as info:
        check_request("/v1/embeddings", body, fn)
    assert info.value.field == field


@pytest.mark.parametrize(("fn", "path", "change", "field"), [
    (BUILTIN, "/v1/chat/completions", {"n": 17}, "n"),
    (BUILTIN, "/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    (BUILTIN, "/v1/chat/completions", {"logit_bias": {"100": 1}}, "logit_bias"),  # the recorded vocabulary
    (BUILTIN, "/v1/embeddings", {"input": 5}, "model"),  # refused at once, whatever the body
    (BUILTIN, "/v1/chat/completions", {"max_tokens": 64}, "max_tokens"),
    (replace(BUILTIN, limits=None), "/v1/chat/completions", {"max_tokens": 64}, None),  # nothing recorded yet
    (replace(BUILTIN, image=""), "/v1/chat/completions", {"top_p": 0}, "top_p"),  # "" is the built-in image
    (BUILTIN, "/v1/embeddings", {"input": "x"}, "model"),
    (USER_IMAGE, "/v1/chat/completions", {"n": 2, "top_p": 0, "max_tokens": 10**6}, None),
    (USER_IMAGE, "/v1/embeddings", {"input": 5}, None),
    (USER_IMAGE, "/v1/chat/completions", {"stream": "yes"}, "stream"),
    (EMBEDDER, "/v1/chat/completions", {}, "model"),  # an embedding model generates nothing
    (EMBEDDER, "/v1/responses", {}, "model"),
    (EMBEDDER, "/v1/completions", {}, "model"),
])
def test_check_request_applies_the_schema_to_builtin_functions_only(
        fn: FunctionInfo, path: str, change: dict[str, object], field: str | None) -> None:
    body = {**CHAT, **change}
    if field is None:
        assert check_request(path, body, fn) is False
        return
    with pytest.raises(errors.InvalidArgument) as info:
        check_request(path, body, fn)
    assert info.value.field == field


def test_check_request_says_whether_to_stream() -> None:
    assert check_request("/v1/chat/completions", {**CHAT, "stream": True}, BUILTIN) is True
    assert check_request("/v1/chat/completions", {**CHAT, "stream": True}, USER_IMAGE) is True


def test_function_info_carries_the_image_and_the_recorded_model() -> None:
    fn = types_pb2.Function(id="acme/default/m", spec=types_pb2.FunctionSpec(image="builtin"))
    assert FunctionInfo.from_proto(fn).builtin and FunctionInfo.from_proto(fn).limits is None
    fn.model.CopyFrom(types_pb2.ModelMetadata(max_context_tokens=512, vocab_size=1000))
    assert FunctionInfo.from_proto(fn).limits == ModelLimits(512, 1000, has_chat_template=False)
    fn.spec.image = "registry.local/echo:1"
    assert not FunctionInfo.from_proto(fn).builtin
