"""Request validation: each bad field is a 400 naming it; unknown fields pass."""

from __future__ import annotations

import json

import pytest

from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_body
from snapwake import errors

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


def test_unknown_fields_are_kept_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    body = {**CHAT, "frobnicate": True, "stream": True, "stream_options": {"include_usage": True}}
    with caplog.at_level("INFO", logger="services.gateway.protocol"):
        request, parsed = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert request.model_extra == {"frobnicate": True}
    assert parsed == body
    assert request.streaming
    assert "frobnicate" in caplog.text


@pytest.mark.parametrize(("body", "streaming"), [
    ({**CHAT}, False), ({**CHAT, "stream": False}, False), ({**CHAT, "stream": True}, True),
    ({**CHAT, "temperature": 1}, False),  # an int is a fine float
])
def test_valid_chat_bodies(body: dict[str, object], streaming: bool) -> None:
    request, _ = parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    assert request.streaming is streaming
