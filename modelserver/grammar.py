"""Structured output: ``response_format`` compiled to a token grammar with xgrammar.

Why xgrammar (over llguidance and outlines-core): it compiles JSON schemas (``strict`` mode,
``additionalProperties: false``, string lengths) and the built-in JSON grammar to a per-token
mask ahead of time, with a cache over the tokenizer's vocabulary; its mask fill is C++ per row
and its ``apply_token_bitmask_inplace`` masks many rows of a batch's logits in one call, which
is what a batched engine needs; it is what vLLM and SGLang use by default, so the schemas users
already send behave the same; and it ships a cp311 wheel with no Rust toolchain.

Compiling happens on the request's side (a worker thread, never the engine thread): the engine
only fills masks (``sampling.sample``) and advances each sequence's matcher. The module imports
xgrammar (and its start-up cost) on first use, so an instance that never sees a
``response_format`` never pays for it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from snapwake.errors import InvalidArgument
from snapwake.openai.schema import JsonObjectFormat, JsonSchemaResponseFormat
from snapwake.openai.structured import FIELD, xgrammar_message

__all__ = ["Grammars"]


class Grammars:
    """Compiles response formats for one tokenizer (the compiler and its cache are made once)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile_schema(self, schema: dict[str, Any], field: str) -> Any:
        """The compiled grammar of a JSON schema made by the server (a forced tool call's)."""
        try:
            return self._get_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError) as exc:
            raise InvalidArgument(f"{field}: cannot be used: {xgrammar_message(exc)}", field=field) from None

    def compile(self, fmt: JsonObjectFormat | JsonSchemaResponseFormat) -> Any:
        """The compiled grammar of ``fmt``; ``InvalidArgument`` naming the schema if xgrammar refuses it.
        Compact JSON (no free whitespace): a model cannot pad its answer with spaces forever."""
        compiler = self._get_compiler()
        if isinstance(fmt, JsonObjectFormat):
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        schema = fmt.json_schema.schema_
        text = json.dumps(schema if schema is not None else {"type": "object"})
        try:
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=bool(fmt.json_schema.strict))
        except (RuntimeError, ValueError) as exc:
            raise InvalidArgument(f"{FIELD}: cannot be used: {xgrammar_message(exc)}", field=FIELD) from None
