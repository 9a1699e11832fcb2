"""Whether a ``response_format`` JSON schema compiles, checked where no tokenizer is at hand.

The gateway refuses a built-in function's request whose schema xgrammar (the model server's
grammar engine, ``modelserver.grammar``) cannot compile, with the same 400 naming
``response_format.json_schema.schema`` (or ``tools``, for a forced call's schema) the model
server would answer, before any claim or cold start. The check is xgrammar's own tokenizer-free ``Grammar.from_json_schema``, with the options
the model server compiles with, so what it accepts the model server accepts.

xgrammar imports torch (seconds, hundreds of MB), and a hostile schema can make it work for
long: a 30-byte ``{"pattern": "c{10000}"}`` takes about 40 s. So compiling happens in one worker
process, started on the first schema (its import is not counted against a request) from a
forkserver that imported xgrammar once (a worker killed for a hostile schema is replaced in
milliseconds), bounded:

- the schema's JSON text is at most ``MAX_SCHEMA_BYTES``;
- one compile may take at most ``timeout`` seconds; past it the worker is killed (and started
  again for the next schema) and the schema is refused as too complex;
- the compiled grammar may have at most ``MAX_GRAMMAR_CHARS`` characters (the model server's
  per-tokenizer compile grows with it), and the worker's address space is capped;
- verdicts are cached by the schema's digest (a client sends the same schema again and again).

One worker compiles one schema at a time, so a tenant sending many distinct slow schemas delays
other tenants' structured requests by up to ``timeout`` each (the gateway's per-tenant limits
bound how many it can send).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import re
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

from snapwake.errors import InvalidArgument, Unavailable

__all__ = ["FIELD", "MAX_GRAMMAR_CHARS", "MAX_SCHEMA_BYTES", "SchemaChecker", "forced_schema", "prewarm",
           "xgrammar_message"]

log = logging.getLogger(__name__)

FIELD = "response_format.json_schema.schema"
MAX_SCHEMA_BYTES = 128 * 1024
MAX_GRAMMAR_CHARS = 1 << 20
_WORKER_EXTRA_BYTES = 2 << 30  # address space the worker may add to what it has after its imports
_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def forced_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema of one call to ``name`` (or to any of ``tools`` when None): what a
    ``required`` or named ``tool_choice`` compiles to (``modelserver.tools``); checked here too."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error without its C++ source location (``[12:00:00] file.cc:12: ``)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return _PREFIX.sub("", lines[-1]) if lines else type(exc).__name__


def _worker(conn: Connection) -> None:  # pragma: no cover - runs in the worker process
    import resource

    import xgrammar as xgr

    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + _WORKER_EXTRA_BYTES, size + _WORKER_EXTRA_BYTES))
    except (OSError, ValueError):
        pass
    conn.send(("ready", None))
    while True:
        try:
            text, strict = conn.recv()
        except (EOFError, OSError):
            return
        try:
            grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=strict)
            conn.send(("ok", len(str(grammar))))
        except Exception as exc:  # noqa: BLE001 - every refusal is the schema's
            conn.send(("error", xgrammar_message(exc)))


def _context() -> Any:
    """A forkserver that imports xgrammar once: never a fork of a threaded server, and a replaced
    worker starts in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["xgrammar", __name__])
    return ctx


def prewarm() -> None:
    """Starts the forkserver (and its xgrammar import) now, so that the first schema does not
    wait for it; blocking: the gateway calls it from a thread at start."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


class SchemaChecker:
    """Compiles JSON schemas in a worker process, bounded in time and size (module docstring)."""

    def __init__(self, timeout: float = 2.0, start_timeout: float = 120.0, cache_size: int = 1024) -> None:
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._cache: OrderedDict[tuple[bytes, bool], str | None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = asyncio.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._thread_lock = threading.Lock()

    async def check(self, schema: Any, strict: bool, field: str = FIELD) -> None:
        """InvalidArgument naming ``field`` if the schema cannot be used."""
        text = json.dumps(schema if schema is not None else {"type": "object"})
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise InvalidArgument(f"{field}: longer than {MAX_SCHEMA_BYTES} bytes", field=field)
        key = (hashlib.sha256(text.encode()).digest(), strict)  # not the text: 1024 large schemas would be 128 MiB
        if key in self._cache:
            self._cache.move_to_end(key)
            verdict = self._cache[key]
        else:
            async with self._lock:  # one worker: one compile at a time
                verdict = await asyncio.to_thread(self._compile, text, strict)
            self._cache[key] = verdict
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if verdict is not None:
            raise InvalidArgument(f"{field}: cannot be used: {verdict}", field=field)

    def _compile(self, text: str, strict: bool) -> str | None:
        """None if ``text`` compiles within the bounds, else why not."""
        with self._thread_lock:
            conn = self._started()
            try:
                conn.send((text, strict))
                if not conn.poll(self.timeout):
                    self._stop()
                    return f"too complex: not compiled within {self.timeout:g}s"
                kind, value = conn.recv()
            except (EOFError, OSError):  # the worker died on it (its memory cap, a crash)
                self._stop()
                return "too complex: compiling it failed"
        if kind == "error":
            return str(value)
        if int(value) > MAX_GRAMMAR_CHARS:
            return f"too complex: its grammar has {value} characters (at most {MAX_GRAMMAR_CHARS})"
        return None

    def _started(self) -> Connection:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            return self._conn
        self._stop()
        ctx = _context()
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(theirs,), name="schema-check", daemon=True)
        proc.start()
        theirs.close()
        if not ours.poll(self.start_timeout):
            proc.kill()
            proc.join(5)
            raise Unavailable("the JSON schema checker did not start")
        ours.recv()
        self._proc, self._conn = proc, ours
        log.info("JSON schema checker started (pid %d)", proc.pid)
        return ours

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def close(self) -> None:
        with self._thread_lock:
            self._stop()
