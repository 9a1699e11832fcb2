"""The ``model`` field between clients and user images: requests carry the served name, answers
(JSON bodies and each SSE event, however the stream is cut) the client's."""

from __future__ import annotations

import json

import pytest

from services.gateway.rewrite import ModelRewrite, SseRewriter, replace_model
from services.gateway.scheduler_client import FunctionInfo
from snapwake.v1 import types_pb2

PUBLIC, SERVED = "team/chat", "Qwen/Qwen2.5-0.5B-Instruct"

REPLACED = [
    ('{"model": "x"}', '{"model": "team/chat"}'),
    ('{"id":"c1","object":"chat.completion","created":1,"model":"Qwen/Qwen2.5-0.5B-Instruct","choices":[]}',
     '{"id":"c1","object":"chat.completion","created":1,"model":"team/chat","choices":[]}'),
    # members before it are skipped whatever they hold, and everything after it is left as sent
    ('{"a": {"model": "inner"}, "b": [1, 2.50, "\\u00e9"], "model" : "x" , "c": 1E3}',
     '{"a": {"model": "inner"}, "b": [1, 2.50, "\\u00e9"], "model" : "team/chat" , "c": 1E3}'),
    ('  {\n "model":\t"x"}\n', '  {\n "model":\t"team/chat"}\n'),
    ('{"model": "with \\"quotes\\" and \\\\"}', '{"model": "team/chat"}'),
    ('{"choices": [{"delta": {"content": "\\"model\\": \\"x\\""}}], "model": "x"}',
     '{"choices": [{"delta": {"content": "\\"model\\": \\"x\\""}}], "model": "team/chat"}'),
]


@pytest.mark.parametrize(("text", "want"), REPLACED)
def test_the_top_level_model_is_replaced_in_place(text: str, want: str) -> None:
    """Members after ``model`` are never read: a body cut short after it still gets the name."""
    assert replace_model(text, PUBLIC) == want
    assert json.loads(want)["model"] == PUBLIC


@pytest.mark.parametrize("text", [
    '{"id": "x"}',  # none
    '{"choices": [{"model": "x"}]}',  # only a nested one
    '{"model": null}', '{"model": 3}',  # not a string
    '[{"model": "x"}]', '"model"', "", "not json", '{"model": "x', '{"a": [1, ',  # not an object, or cut short
    '{"model" "x"}', '{"a": 1 "model": "x"}', "{'model': 'x'}",
])
def test_anything_else_is_passed_on_as_it_is(text: str) -> None:
    assert replace_model(text, PUBLIC) is None


def _event(i: int, model: str = SERVED) -> bytes:
    return b"data: " + json.dumps({"id": f"c{i}", "object": "chat.completion.chunk", "model": model,
                                   "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}).encode() + b"\n\n"


STREAM = b"".join([_event(0), b": a comment\n\n", _event(1), b"event: ping\ndata: {\"x\": 1}\n\n",
                   b"data:" + _event(2)[6:], _event(3).replace(b"\n", b"\r\n"), b"data: [DONE]\n\n"])
WANT = STREAM.replace(json.dumps(SERVED).encode(), json.dumps(PUBLIC).encode())


def _relay(pieces: list[bytes]) -> bytes:
    sse = SseRewriter(PUBLIC)
    return b"".join(sse.feed(p) for p in pieces) + sse.flush()


def test_a_stream_in_one_piece() -> None:
    assert _relay([STREAM]) == WANT
    assert b'"model": "team/chat"' in WANT and json.dumps(SERVED).encode() not in WANT


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_stream_cut_anywhere(cut: int) -> None:
    assert _relay([STREAM[:cut], STREAM[cut:]]) == WANT


def test_a_stream_byte_by_byte_holds_back_only_the_current_line() -> None:
    sse = SseRewriter(PUBLIC)
    out = []
    for i in range(len(STREAM)):
        out.append(sse.feed(STREAM[i:i + 1]))
        if STREAM[i:i + 1] == b"\n":  # every complete line went out, rewritten
            assert b"".join(out) == STREAM[:i + 1].replace(json.dumps(SERVED).encode(), json.dumps(PUBLIC).encode())
    assert b"".join(out) + sse.flush() == WANT


def test_a_last_line_without_newline_is_flushed_rewritten() -> None:
    last = _event(4).rstrip(b"\n")
    assert _relay([last[:10], last[10:]]) == last.replace(json.dumps(SERVED).encode(), json.dumps(PUBLIC).encode())


def test_a_line_over_the_limit_passes_unchanged_without_being_held() -> None:
    sse = SseRewriter(PUBLIC, max_line=64)
    huge = _event(5).rstrip(b"\n") + b" " * 100 + b"\n\n"
    first = sse.feed(huge[:80])
    assert first == huge[:80]  # past the limit: relayed at once, not rewritten
    assert sse.feed(huge[80:] + _event(6)) + sse.flush() == huge[80:] + _event(6, PUBLIC)


def test_non_utf8_and_non_json_events_pass_unchanged() -> None:
    stream = b'data: {"model": "\xff"}\n\ndata: hello "model"\n\n'
    assert _relay([stream]) == stream


@pytest.mark.parametrize(("body", "served", "model"), [
    ({"model": "team/chat", "messages": []}, SERVED, SERVED),
    ({"model": "team/chat", "messages": []}, "", "team/chat"),  # no served name: passed on as it came
])
def test_requests_carry_the_served_name(body: dict[str, object], served: str, model: str) -> None:
    raw = json.dumps(body).encode()
    out = ModelRewrite("team/chat", served).request(body, raw)
    assert json.loads(out) == {**body, "model": model}
    assert (out is raw) is (not served)


def test_whole_answers_json_or_stream() -> None:
    rw = ModelRewrite(PUBLIC, SERVED)
    body = json.dumps({"id": "c", "model": SERVED, "usage": {"total_tokens": 3}}).encode()
    assert json.loads(rw.response(body, "application/json")) == {"id": "c", "model": PUBLIC,
                                                                 "usage": {"total_tokens": 3}}
    assert rw.response(STREAM, "text/event-stream; charset=utf-8") == WANT
    error = b'{"error": {"message": "bad", "type": "invalid_request_error"}}'
    assert rw.response(error, "application/json") is error


def test_the_gateway_learns_the_served_name_from_list_functions() -> None:
    fn = types_pb2.Function(id="acme/team/chat", spec=types_pb2.FunctionSpec(
        image="oci-archive:/srv/chat.tar", served_model_name=SERVED))
    info = FunctionInfo.from_proto(fn)
    assert (info.builtin, info.served_model_name) == (False, SERVED)
    assert FunctionInfo.from_proto(types_pb2.Function(id="acme/default/m")).builtin
