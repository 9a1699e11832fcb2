"""Checks on the shape of the production source (services/, snapwake/ but not its generated v1/,
modelserver/), read as syntax trees."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _production_sources() -> Iterator[tuple[str, str]]:
    for top in ("services", "snapwake", "modelserver"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith("snapwake/v1/"):
                yield rel, path.read_text()


# ---- gRPC edges: one translation point per side --------------------------------------------------

# The only module that may catch grpc.RpcError and call errors.from_rpc_error (the client side),
# and the only one that may answer a status through the servicer context (the server side).
_GRPC_CLIENT_EDGE = "snapwake/grpcclient.py"
_GRPC_SERVER_EDGE = "snapwake/grpcserver.py"
# aetcd talks gRPC too: the etcd wrapper is that edge's one translation point (of RpcError as well).
_ETCD_EDGE = "snapwake/etcd.py"
_RPC_ERROR_EDGES = {_GRPC_CLIENT_EDGE, _ETCD_EDGE}
_CONTEXT_NAMES = {"context", "ctx", "servicer_context"}
_STATUS_CALLS = {"abort", "abort_with_status", "set_code"}
# Decorators that translate nothing: the scheduler's admin methods authenticate the bearer token
# and write the audit line there, and re-raise whatever the method raised, untouched.
_NON_TRANSLATING_DECORATORS = {"_admin"}


def _grpc_edge_violations(rel: str, source: str) -> list[str]:
    """Where ``source`` (the file ``rel``) translates gRPC errors outside the two edge modules."""
    found = [f"{rel}: mentions translate_errors"] if "translate_errors" in source else []
    tree = ast.parse(source, rel)
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ExceptHandler) and node.type is not None and rel not in _RPC_ERROR_EDGES \
                and "RpcError" in ast.unparse(node.type):
            found.append(f"{where}: catches {ast.unparse(node.type)}")
        elif isinstance(node, ast.Call) and rel != _GRPC_CLIENT_EDGE:
            name = ast.unparse(node.func)
            if name.endswith("from_rpc_error"):
                found.append(f"{where}: calls {name}")
            elif name == "isinstance" and rel != _ETCD_EDGE and len(node.args) == 2 and "RpcError" in ast.unparse(node.args[1]):
                found.append(f"{where}: tests isinstance(..., {ast.unparse(node.args[1])})")
        if isinstance(node, ast.Call) and rel != _GRPC_SERVER_EDGE and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _STATUS_CALLS and ast.unparse(node.func.value) in _CONTEXT_NAMES:
            found.append(f"{where}: answers a status itself ({ast.unparse(node.func)})")
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Servicer") for b in node.bases):
            for fn in node.body:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                named = [d for d in fn.decorator_list
                         if ast.unparse(d.func if isinstance(d, ast.Call) else d) not in _NON_TRANSLATING_DECORATORS]
                if named:
                    decorators = ", ".join(ast.unparse(d) for d in named)
                    found.append(f"{rel}:{fn.lineno}: servicer method {node.name}.{fn.name} is decorated ({decorators})")
    return found


def test_grpc_errors_are_translated_only_at_the_edges() -> None:
    """Servers answer through snapwake.grpcserver.ErrorInterceptor (no per-method decorator, no
    context.abort in a servicer); clients translate only through snapwake.grpcclient."""
    sources = dict(_production_sources())
    assert _GRPC_CLIENT_EDGE in sources and _GRPC_SERVER_EDGE in sources
    assert "except grpc.RpcError" in sources[_GRPC_CLIENT_EDGE]  # the check below looks at real code
    violations = [v for rel, source in sources.items() for v in _grpc_edge_violations(rel, source)]
    assert violations == []


@pytest.mark.parametrize(("rel", "source"), [
    ("services/x/client.py", "try:\n    f()\nexcept grpc.RpcError:\n    pass\n"),
    ("services/x/client.py", "try:\n    f()\nexcept (ValueError, grpc.aio.AioRpcError) as e:\n    pass\n"),
    ("snapwake/cli.py", "raise errors.from_rpc_error(exc)\n"),
    ("services/x/dash.py", "ok = isinstance(exc, grpc.RpcError)\n"),
    ("services/x/api.py", "async def f(context):\n    await context.abort(grpc.StatusCode.NOT_FOUND, 'x')\n"),
    ("services/x/api.py", "from snapwake.grpcserver import translate_errors\n"),
    ("services/x/api.py", "class A(pb_grpc.XServiceServicer):\n    @wrap\n    async def M(self, request, context):\n"
                          "        return 1\n"),
], ids=["except-RpcError", "except-AioRpcError-in-tuple", "from_rpc_error", "isinstance", "context.abort",
        "translate_errors", "decorated-servicer-method"])
def test_grpc_edge_check_catches_violations(rel: str, source: str) -> None:
    assert _grpc_edge_violations(rel, source) != []


def test_grpc_edge_check_passes_the_edges_and_unrelated_aborts() -> None:
    assert _grpc_edge_violations(_GRPC_CLIENT_EDGE, "try:\n    f()\nexcept grpc.RpcError as e:\n"
                                                    "    raise errors.from_rpc_error(e)\n") == []
    assert _grpc_edge_violations(_GRPC_SERVER_EDGE, "async def f(context):\n    await context.abort(c, 'x')\n") == []
    assert _grpc_edge_violations("services/blobstore/core.py", "writer.abort()\n") == []


# ---- one of each: helpers that used to exist in several copies ---------------------------------

def _defs(sources: dict[str, str], name: str) -> list[str]:
    """Where a module-level function ``name`` is defined in production code."""
    return [rel for rel, source in sources.items() for node in ast.parse(source, rel).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name]


def _lines_matching(sources: dict[str, str], needle: str) -> list[str]:
    return [f"{rel}:{i}" for rel, source in sources.items()
            for i, line in enumerate(source.splitlines(), 1) if needle in line]


def test_one_traceparent_one_cuda_helper_one_openai_error_body() -> None:
    sources = dict(_production_sources())
    assert _defs(sources, "traceparent") == ["snapwake/telemetry.py"]
    # Trace context is injected and extracted only through snapwake.telemetry.
    assert {loc.split(":")[0] for loc in _lines_matching(sources, "propagate.")} <= {"snapwake/telemetry.py"}
    # CUDA driver results are unwrapped in one place: nobody else compares with CUDA_SUCCESS.
    assert {loc.split(":")[0] for loc in _lines_matching(sources, "CUDA_SUCCESS")} == {"snapwake/cuda.py"}
    assert _defs(sources, "error_body") == ["snapwake/openai/errors.py"]
    # The OpenAI error shape is built by error_body alone.
    assert {loc.split(":")[0] for loc in _lines_matching(sources, '{"error": {')} == {"snapwake/openai/errors.py"}


def test_no_raw_etcd_client_outside_its_wrapper() -> None:
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    tests = {path.relative_to(ROOT).as_posix(): path.read_text() for path in (ROOT / "tests").rglob("*.py")}
    everywhere = {**dict(_production_sources()), **tests}
    everywhere.pop(me)
    importers = [rel for rel, source in everywhere.items() if re.search(r"^\s*(import|from) aetcd\b", source, re.M)]
    assert importers == ["snapwake/etcd.py"]
    # Nobody outside the wrapper reaches its private client (``etcd._client``, ``self.etcd._client``).
    reach = [f"{rel}:{m.group(0)}" for rel, source in everywhere.items() if rel != "snapwake/etcd.py"
             for m in re.finditer(r"\w*etcd\w*\._client\b", source, re.I)]
    assert reach == []


def test_terminal_states_are_defined_once() -> None:
    sources = dict(_production_sources())
    # A set literal naming ENDED and FAILED together is the terminal set: only lifecycle.py has one.
    found = []
    for rel, source in sources.items():
        for node in ast.walk(ast.parse(source, rel)):
            if isinstance(node, ast.Set | ast.Tuple):
                names = ast.unparse(node)
                if "INSTANCE_STATE_ENDED" in names and "INSTANCE_STATE_FAILED" in names:
                    found.append(f"{rel}:{node.lineno}")
    assert found and {loc.split(":")[0] for loc in found} == {"snapwake/lifecycle.py"}
