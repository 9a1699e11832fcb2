"""The edge's pure parts, with tables: ``check_body``, the token bucket and ``KeyLimiter``, the JSON
depth scan, and the key store (digests only, the CLI's entries)."""

from __future__ import annotations

import hashlib
import io
import sys
from typing import Any

import pytest

from services.gateway.config import GatewayConfig
from services.gateway.keys import KeyStore, Principal, hash_entry, hash_key, main, new_key
from services.gateway.limits import EdgeLimits, KeyLimiter, TokenBucket, check_body
from snapwake.errors import InvalidArgument
from snapwake.openai import parse_json
from snapwake.openai.schema import json_depth

CAPS = EdgeLimits(max_messages=3, max_prompt_chars=10, max_tokens=100, max_n=2)
MSG = {"role": "user", "content": "x"}


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": [MSG] * 4}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 11}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdef"}] * 2}]}, "messages"),
    ({"prompt": "x" * 11}, "prompt"),
    ({"prompt": [1] * 11}, "prompt"),
    ({"prompt": ["x" * 6, "y" * 6]}, "prompt"),
    ({"messages": [MSG], "max_tokens": 101}, "max_tokens"),
    ({"messages": [MSG], "max_completion_tokens": 101}, "max_completion_tokens"),
    ({"messages": [MSG], "n": 3}, "n"),
])
def test_check_body_names_the_field_over_its_cap(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_body(body, CAPS)
    assert info.value.field == field and info.value.message.startswith(field + ":")


@pytest.mark.parametrize("body", [
    {"messages": [MSG] * 3, "max_tokens": 100, "n": 2},
    {"prompt": "x" * 10},
    {"messages": "not a list", "max_tokens": "5", "n": True},  # wrong types are the schema's to refuse
    {"messages": [None, {"content": None}]},
])
def test_check_body_lets_through_what_fits(body: dict[str, Any]) -> None:
    check_body(body, CAPS)
    check_body({"messages": [MSG] * 10_000, "max_tokens": 10**9, "n": 99}, EdgeLimits())  # 0: no caps


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # a token every 0.5 s
    assert bucket.take(0.25) == pytest.approx(0.25)  # a refusal takes nothing
    assert bucket.take(0.5) == 0.0
    assert [bucket.take(100.0) for _ in range(4)][-1] > 0  # refills to the burst, no further


def test_key_limiter_rate_and_in_flight_are_per_key() -> None:
    limiter = KeyLimiter(rate=0.25, burst=1, concurrent=2)
    assert limiter.admit("a", 0.0) is None and limiter.admit("b", 0.0) is None
    refused = limiter.admit("a", 0.1)
    assert refused is not None and not refused.in_flight and refused.retry_after == 4  # ceil(3.9)
    limiter = KeyLimiter(rate=0, burst=1, concurrent=2)
    assert limiter.admit("a", 0) is None and limiter.admit("a", 0) is None
    refused = limiter.admit("a", 0)
    assert refused is not None and refused.in_flight and refused.retry_after == 1
    assert limiter.admit("b", 0) is None
    limiter.done("a")
    assert limiter.admit("a", 0) is None and limiter.in_flight("a") == 2


@pytest.mark.parametrize(("raw", "depth"), [
    (b"{}", 1), (b"[[], {}, [[1]]]", 3), (b'{"a": "[[[[{{{{"}', 1), (b'["\\"[[[", ["]"]]', 2),
    (b'"just a string"', 0), (b"[" * 100_000, 100_000),
])
def test_json_depth_skips_strings(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def test_parse_json_refuses_deep_bodies_by_name() -> None:
    assert parse_json(b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}")["a"]  # 64 levels: fine
    for raw in (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(InvalidArgument, match="nested deeper than 64") as info:
            parse_json(raw)
        assert info.value.field == "body"


def test_key_store_keeps_digests_only() -> None:
    key = new_key()
    assert key.startswith("sk-") and len(key) == 46 and new_key() != key
    entry = hash_entry(key, "acme")
    assert entry == f"sha256:{hashlib.sha256(key.encode()).hexdigest()}:acme" and hash_key(key) in entry
    store = KeyStore.parse([entry, "sk-dev:dev"])
    assert store.plaintext == 1 and store.tenants == {"acme", "dev"}
    assert store.lookup(key) == Principal("acme", entry[7:19])
    assert store.lookup("sk-dev") is not None and store.lookup("sk-dev").tenant == "dev"  # type: ignore[union-attr]
    assert all(store.lookup(k) is None for k in (key[:-1], entry, entry[7:71], "", "sk-dev:dev"))
    assert key not in repr(vars(store)) and "sk-dev" not in repr(vars(store))


@pytest.mark.parametrize("entry", ["sha256:abc:acme", "sha256:" + "A" * 64 + ":acme", "sha256:" + "a" * 64,
                                   "no-tenant", ":acme", "sk:"])
def test_bad_key_entries_are_named_by_position_not_text(entry: str) -> None:
    errors = GatewayConfig(api_keys=("sk-fine:t", entry), operator_keys=(entry,)).validate()
    assert [e.split(" entry")[0] for e in errors] == ["api_keys", "operator_keys"]
    assert "#2" in errors[0] and "#1" in errors[1] and all(entry not in e for e in errors)


def test_the_cli_prints_an_entry_that_admits_its_key(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key, entry = lines[0].rsplit(" ", 1)[1], lines[1].rsplit(" ", 1)[1]
    assert KeyStore.parse([entry]).lookup(key) == Principal("acme", entry[7:19])
    monkeypatch.setattr(sys, "stdin", io.StringIO("sk-given\n"))
    assert main(["hash", "acme"]) == 0
    assert capsys.readouterr().out.split()[-1] == hash_entry("sk-given", "acme")
    assert main(["new"]) == 2 and main(["new", "a:b"]) == 2
