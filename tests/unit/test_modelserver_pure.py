"""Pure model server logic: sampling validation, stop strings, SSE framing, arena layout."""

from __future__ import annotations

import json

import pytest

from modelserver import manifest
from modelserver.manifest import TensorSpec
from modelserver.openai import sse
from modelserver.sampling import parse_sampling
from modelserver.stops import StopFilter
from snapwake.errors import InvalidArgument


@pytest.mark.parametrize(("body", "field"), [
    ({"n": 0}, "n"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": 3}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"n": 17}, "n"),
    ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_sampling_fields_are_named(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_sampling(body, None)
    assert err.value.field == field


@pytest.mark.parametrize(("body", "default", "want"), [
    ({}, 16, {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "stop": ()}),
    ({"max_tokens": 5, "max_completion_tokens": 7}, None, {"max_tokens": 7}),
    ({"max_tokens": 5}, None, {"max_tokens": 5}),
    ({"temperature": 0, "top_p": 0.5, "seed": 3}, None, {"temperature": 0.0, "top_p": 0.5, "seed": 3}),
    ({"stop": "x"}, None, {"stop": ("x",)}),
    ({"stop": ["x", "yz"], "n": 1}, None, {"stop": ("x", "yz")}),
    ({"stream": True, "stream_options": {"include_usage": True}}, None, {"stream": True, "include_usage": True}),
])
def test_sampling_parses(body: dict, default: int | None, want: dict) -> None:
    params = parse_sampling(body, default)
    assert {k: getattr(params, k) for k in want} == want


@pytest.mark.parametrize(("stops", "pieces", "want_text", "stopped"), [
    (("END",), ["hello ", "world"], "hello world", False),
    (("END",), ["hello E", "N", "D more"], "hello ", True),
    (("END",), ["abcEND"], "abc", True),
    (("END",), ["EN", "X"], "ENX", False),
    (("\n\n", "."), ["one", ". two"], "one", True),
    (("ab", "b"), ["xab"], "x", True),
    ((), ["a", "b"], "ab", False),
    (("stop",), ["sto"], "sto", False),
])
def test_stop_filter(stops: tuple[str, ...], pieces: list[str], want_text: str, stopped: bool) -> None:
    f = StopFilter(stops)
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert (out, f.stopped) == (want_text, stopped)


def test_stop_filter_holds_back_only_possible_prefixes() -> None:
    f = StopFilter(("STOP",))
    assert f.feed("abcST") == "abc"
    assert f.feed("x") == "STx"


def test_sse_event_framing() -> None:
    raw = sse.event({"a": 1, "b": "é"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    assert json.loads(raw[len(b"data: "):]) == {"a": 1, "b": "é"}
    assert sse.DONE == b"data: [DONE]\n\n"


def test_usage_chunks_have_no_choices() -> None:
    use = sse.usage(3, 4)
    assert use == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert sse.chat_chunk("i", "m", 0, None, None, use)["choices"] == []
    assert sse.completion_chunk("i", "m", 0, None, None, use)["choices"] == []
    assert sse.chat_chunk("i", "m", 0, {}, "stop")["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("entries", "offsets", "size"), [
    ([("a", "float32", (3,))], [0], 256),
    ([("a", "float32", (64,)), ("b", "bfloat16", (1,))], [0, 256], 512),
    ([("a", "uint8", (257,)), ("b", "float16", (2, 3))], [0, 512], 768),
    ([("a", "bfloat16", (128, 2)), ("b", "int8", (0,)), ("c", "float32", (1,))], [0, 512, 512], 768),
])
def test_plan_aligns_every_tensor(entries: list, offsets: list[int], size: int) -> None:
    specs, arena_bytes = manifest.plan(entries)
    assert [s.offset for s in specs] == offsets
    assert arena_bytes == size
    assert all(s.offset % manifest.ALIGN == 0 for s in specs)
    manifest.validate(specs, arena_bytes)


@pytest.mark.parametrize(("spec", "arena_bytes", "needle"), [
    (TensorSpec("w", "float32", (4,), 8, 16), 256, "aligned"),
    (TensorSpec("w", "float32", (4,), 0, 15), 256, "nbytes"),
    (TensorSpec("w", "float32", (100,), 0, 400), 256, "past the arena"),
    (TensorSpec("w", "complex32", (1,), 0, 4), 256, "dtype"),
])
def test_validate_names_the_bad_tensor(spec: TensorSpec, arena_bytes: int, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        manifest.validate([spec], arena_bytes)
    assert "w" in err.value.message and needle in err.value.message


def test_validate_rejects_overlap() -> None:
    specs = [TensorSpec("a", "float32", (128,), 0, 512), TensorSpec("b", "float32", (1,), 256, 4)]
    with pytest.raises(InvalidArgument, match="b: overlaps"):
        manifest.validate(specs, 1024)


def test_manifest_json_round_trip() -> None:
    specs, size = manifest.plan([("x.weight", "bfloat16", (4, 8)), ("y", "float32", (3,))])
    msg = manifest.to_proto(specs, size, {"model_config": {"hidden_size": 8}, "dtype": "bfloat16"}, "t/n/f@1")
    data = json.loads(json.dumps(manifest.to_json(msg)))  # as sent on the socket
    assert data["snapshot_id"] == "t/n/f@1" and "chunk_sha256" not in data
    got_specs, got_size, cfg = manifest.from_json(data)
    assert (got_specs, got_size, cfg["dtype"]) == (specs, size, "bfloat16")


def test_bad_manifest_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as err:
        manifest.from_json({"arena_bytes": "x"})
    assert err.value.field == "manifest"
