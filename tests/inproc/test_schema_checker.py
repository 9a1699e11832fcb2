"""The gateway's JSON schema check (``snapwake.openai.structured``): xgrammar in a worker process,
bounded in time; a hostile schema is refused and the worker replaced, and the verdicts match what
the model server's own compile (``modelserver.grammar``, with the tokenizer) says."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelserver.__main__ import load_tokenizer
from modelserver.grammar import Grammars
from snapwake.errors import InvalidArgument
from snapwake.openai.schema import JsonSchemaResponseFormat
from snapwake.openai.structured import FIELD, MAX_SCHEMA_BYTES, SchemaChecker, forced_schema


@pytest.fixture(scope="module")
def checker() -> Iterator[SchemaChecker]:
    c = SchemaChecker(timeout=1.0)
    yield c
    c.close()


SCHEMAS = [
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
      "additionalProperties": False}, None),
    ({"type": "frob"}, 'Unsupported type "frob"'),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, ""),
]


async def test_verdicts_match_the_model_servers_compile(checker: SchemaChecker, demo_model_dir: Path) -> None:
    grammars = Grammars(load_tokenizer(demo_model_dir), 512, {2})
    for schema, words in SCHEMAS:
        fmt = JsonSchemaResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        server: InvalidArgument | None = None
        try:
            grammars.compile(fmt)
        except InvalidArgument as exc:
            server = exc
        if words is None:
            assert server is None
            await checker.check(schema, True)
            continue
        with pytest.raises(InvalidArgument) as info:
            await checker.check(schema, True)
        assert info.value.field == FIELD and words in info.value.message
        assert server is not None and server.message == info.value.message  # the same words on both sides
    # A forced tool call's schema (its parameters inside), refused naming tools on both sides.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]
    with pytest.raises(InvalidArgument) as info:
        await checker.check(forced_schema(tools, "f"), True, field="tools")
    with pytest.raises(InvalidArgument) as there:
        grammars.compile_schema(forced_schema(tools, "f"), "tools")
    assert info.value.field == there.value.field == "tools" and info.value.message == there.value.message


async def test_a_hostile_schema_is_cut_off_and_the_worker_replaced(checker: SchemaChecker) -> None:
    await checker.check({"type": "object"}, False)  # the worker's start is not counted below
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="too complex: not compiled within 1s") as info:
        await checker.check({"type": "string", "pattern": "c{10000}"}, False)  # ~40 s if let run
    assert time.monotonic() - t0 < 10 and info.value.field == FIELD
    with pytest.raises(InvalidArgument, match="too complex"):  # cached: not compiled again
        await checker.check({"type": "string", "pattern": "c{10000}"}, False)
    await checker.check({"type": "array", "items": {"type": "integer"}}, True)  # a fresh worker answers
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_SCHEMA_BYTES} bytes"):
        await checker.check({"enum": ["x" * 1000] * 200}, False)
