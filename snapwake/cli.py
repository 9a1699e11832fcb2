"""The ``snapwake`` admin command line: deploy, list, get, delete, logs, snapshots, nodes, instances,
``node cordon|drain|uncordon NODE``, and (operators) ``token``, ``apikey`` and ``quota``.

With the scheduler's ``admin_auth`` on, every call carries ``authorization: Bearer <token>``:
the token is read from ``--token-file``, else the file named by ``$SNAPWAKE_TOKEN_FILE``, else
``$SNAPWAKE_TOKEN`` (never a command-line argument: those show in ``ps``). ``token create`` and
``apikey create`` print the new secret once; it is stored nowhere.

It talks to the scheduler's admin API (``SchedulerService``) with a deadline on every call and
tries the next ``--scheduler`` address when one answers UNAVAILABLE (a standby scheduler says
"not the leader"; a dead one refuses the connection). Every failure prints one line and exits
with a code a script can test:

    0 ok, 1 other error, 2 usage or bad input, 3 not found, 4 already exists, 5 unavailable,
    7 unauthenticated or permission denied, 8 over a quota, 6 the deployed function FAILED (``deploy --wait``; the node's reason follows, with the tail
    of the container's output, on the lines after the first).

``deploy`` takes a spec file (YAML or JSON, FunctionSpec fields) and flags, which win; a user
image is any ``--image`` but ``builtin`` (``oci-archive:/path/img.tar``, ``ghcr.io/org/img:tag``).
Its state goes to stderr (with ``--wait``: once the deploy is validated or failed), and progress
too, so ``-o json`` output on stdout stays parseable.

The admin API is TLS without a client certificate: ``--ca`` (or ``$SNAPWAKE_CA``) names the CA the
scheduler's certificate is checked against (``make run``: ``var/pki/ca.crt``), else the system's
roots; ``--plaintext`` is for a cluster run with ``--dev-plaintext``.

``node cordon`` keeps new instances off a node; ``node drain`` also moves its instances off it
(each stops once it serves no request; replacements start elsewhere) and waits, unless
``--no-wait``, until none is left there; ``node uncordon`` lifts either.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from snapwake import errors
from snapwake.grpcclient import call, channel
from snapwake.imageref import is_builtin
from snapwake.lifecycle import GONE
from snapwake.tlsconfig import ClientTls
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

__all__ = ["AdminClient", "DeployFailed", "build_spec", "main", "parse_duration", "parse_size"]


class DeployFailed(errors.FailedPrecondition):
    """The deployed function is FAILED; the message's first line says so, the rest is why."""

EXIT_CODES: dict[type[errors.SnapwakeError], int] = {
    errors.InvalidArgument: 2, errors.NotFound: 3, errors.AlreadyExists: 4,
    errors.Unavailable: 5, errors.DeadlineExceeded: 5, DeployFailed: 6,
    errors.Unauthenticated: 7, errors.PermissionDenied: 7, errors.ResourceExhausted: 8,
}
DEFAULT_SCHEDULER = "127.0.0.1:7001"


class AdminClient:
    """SchedulerService over several addresses; sticks to the one that answered last."""

    def __init__(self, addresses: Sequence[str], timeout: float, token: str = "",
                 tls: ClientTls | None = None) -> None:
        """``tls``: server-authenticated TLS to the schedulers' admin port (no client
        certificate); None: plaintext, for a ``dev_plaintext`` cluster."""
        if not addresses:
            raise errors.InvalidArgument("--scheduler: no address given")
        self.addresses = list(addresses)
        self.timeout = timeout
        self.tls = tls
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def call(self, method: str, request: Message) -> Any:
        """Calls ``method``; raises the domain error, or Unavailable once every address failed."""
        last = ""
        for address in list(self.addresses):
            async with channel(address, self.tls, server_role="scheduler" if self.tls and self.tls.ca else "") as ch:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
                try:
                    response = await call(functools.partial(getattr(stub, method), metadata=self.metadata), request,
                                          timeout=self.timeout)
                except errors.Unavailable as exc:  # a standby ("not the leader") or a dead address
                    last = f"{address}: {exc.message}"
                    continue
            self.addresses.remove(address)
            self.addresses.insert(0, address)
            return response
        raise errors.Unavailable(f"no scheduler answered (last {last})")


# ---- spec: YAML and flags to FunctionSpec -------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_FIELDS = ("resources.gpu_memory_bytes", "resources.host_memory_bytes")
_DURATION_FIELDS = ("policy.queue_timeout", "policy.idle_timeout", "policy.start_timeout")
# Flag name -> FunctionSpec path (the YAML uses the same paths, nested).
_FLAGS = {
    "name": "name", "namespace": "namespace", "tenant": "tenant", "image": "image",
    "model_dir": "model_dir", "http_port": "http_port", "health_path": "health_path",
    "sample_request": "sample_request", "gpu_memory": "resources.gpu_memory_bytes",
    "gpu_count": "resources.gpu_count", "host_memory": "resources.host_memory_bytes",
    "cpu_millis": "resources.cpu_millis", "min": "policy.min_instances",
    "max": "policy.max_instances", "standby_per_node": "policy.standby_per_node",
    "concurrency": "policy.concurrency", "queue_len": "policy.queue_len",
    "queue_timeout": "policy.queue_timeout", "idle_timeout": "policy.idle_timeout",
    "start_timeout": "policy.start_timeout", "snapshot_mode": "policy.snapshot_mode",
    # user images
    "port": "http_port", "served_model_name": "served_model_name", "registry_secret": "registry_secret",
    "readiness_path": "health_path", "warmup_request": "sample_request",
}


def parse_size(value: Any) -> int:
    """``20GiB``/``20G``/``512MiB``/``1024`` to bytes (K/M/G/T are powers of 1024 either way,
    since GPU slices are always thought of in GiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 20GiB, got {value!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def parse_duration(value: Any) -> float:
    """``30s``/``500ms``/``5m``/``1h``/a number of seconds, to seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        doc = doc.setdefault(p, {})
    doc[leaf] = value


def _normalise(doc: dict[str, Any], path: str, convert: Callable[[Any], Any]) -> None:
    *parents, leaf = path.split(".")
    node: Any = doc
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        try:
            node[leaf] = convert(node[leaf])
        except ValueError as exc:
            raise errors.InvalidArgument(f"{path}: {exc}", field=path) from None


def build_spec(doc: Any, flags: dict[str, Any], env: Sequence[str] = ()) -> types_pb2.FunctionSpec:
    """Merges a YAML document (FunctionSpec fields) with flags (which win) into a FunctionSpec."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise errors.InvalidArgument("spec: the YAML top level must be a mapping of FunctionSpec fields")
    for key, path in _FLAGS.items():
        if flags.get(key) is not None:
            _put(doc, path, flags[key])
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise errors.InvalidArgument(f"--env: expected KEY=VALUE, got {item!r}", field="env")
        _put(doc, "env", {**doc.get("env", {}), k: v})
    if flags.get("cmd"):
        doc["command"] = list(flags["cmd"])
    if flags.get("args") is not None:
        try:
            doc["args"] = shlex.split(flags["args"])
        except ValueError as exc:
            raise errors.InvalidArgument(f"--args: {exc}", field="args") from None
    doc.setdefault("tenant", "default")
    doc.setdefault("namespace", "default")
    for path in _SIZE_FIELDS:
        _normalise(doc, path, parse_size)
    for path in _DURATION_FIELDS:
        _normalise(doc, path, lambda v: f"{parse_duration(v):.3f}s")
    _normalise(doc, "policy.snapshot_mode",
               lambda v: v if str(v).startswith("SNAPSHOT_MODE_") else "SNAPSHOT_MODE_" + str(v).upper())
    try:
        return json_format.ParseDict(doc, types_pb2.FunctionSpec())
    except json_format.ParseError as exc:
        raise errors.InvalidArgument("spec: " + str(exc).splitlines()[0].rstrip(".")) from None


# ---- deploy --wait ------------------------------------------------------------------------------

class _Bar:
    """tqdm when installed (it is, through transformers), else a plain text bar."""

    def __init__(self, desc: str, total: int, unit: str, err: TextIO) -> None:
        self.err, self.desc, self.total, self.n = err, desc, total, 0
        try:
            from tqdm import tqdm

            self.tqdm: Any = tqdm(desc=desc, total=total or None, unit=unit, unit_scale=unit == "B",
                                  file=err, leave=True, dynamic_ncols=True)
        except ImportError:
            self.tqdm = None

    def update(self, n: int, total: int) -> None:
        if self.tqdm is not None:
            self.tqdm.total = total or None
            self.tqdm.update(n - self.tqdm.n)
        elif (n, total) != (self.n, self.total):
            frac = n / total if total else 0.0
            self.err.write(f"\r{self.desc} [{'#' * int(frac * 30):<30}] {n}/{total}")
        self.n, self.total = n, total

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        else:
            self.err.write("\n")


async def _wait_snapshot(client: AdminClient, fn: types_pb2.Function, deadline: float, err: TextIO) -> types_pb2.Function:
    bar = _Bar("snapshot", 0, "B", err)
    try:
        while True:
            fn = (await client.call("GetFunction", scheduler_pb2.GetFunctionRequest(function_id=fn.id))).function
            _check_deployed(fn)
            snaps = (await client.call("ListSnapshots", scheduler_pb2.ListSnapshotsRequest(function_id=fn.id))).snapshots
            snap = next((s for s in snaps if s.revision == fn.revision), None)
            if snap is not None:
                bar.update(snap.bytes_written, snap.total_bytes)
            if fn.state == types_pb2.FUNCTION_STATE_READY or (snap and snap.state == types_pb2.SNAPSHOT_STATE_READY):
                return fn
            if time.monotonic() > deadline:
                got = f"{snap.bytes_written}/{snap.total_bytes} bytes" if snap else "not started"
                raise errors.DeadlineExceeded(f"--wait-timeout: snapshot of {fn.id} still building ({got})")
            await asyncio.sleep(0.5)
    finally:
        bar.close()


async def _wait_validated(client: AdminClient, fn: types_pb2.Function, deadline: float,
                          err: TextIO) -> types_pb2.Function:
    """Waits while a user image's revision is PENDING: a node pulls, starts, probes and warms it up."""
    err.write(f"validating {fn.spec.image} on a node (pull, start, readiness, warm-up)...\n")
    while fn.state == types_pb2.FUNCTION_STATE_PENDING:
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded(f"--wait-timeout: {fn.id} is still being validated")
        await asyncio.sleep(0.5)
        fn = (await client.call("GetFunction", scheduler_pb2.GetFunctionRequest(function_id=fn.id))).function
    return fn


def _check_deployed(fn: types_pb2.Function) -> None:
    if fn.state == types_pb2.FUNCTION_STATE_FAILED:
        raise DeployFailed(f"function {fn.id} revision {fn.revision} FAILED:\n{fn.status_message}")


def _state_line(fn: types_pb2.Function) -> str:
    state = _enum(fn.state, types_pb2.FunctionState, "FUNCTION_STATE_")
    image = f", image {fn.spec.image}" + (f"@{fn.image_digest}" if fn.image_digest else "")
    return f"{fn.id} revision {fn.revision}: {state}{'' if is_builtin(fn.spec.image) else image}\n"


async def _wait_standby(client: AdminClient, fn: types_pb2.Function, deadline: float, err: TextIO) -> None:
    nodes = (await client.call("ListNodes", scheduler_pb2.ListNodesRequest())).nodes
    need = fn.spec.resources.gpu_count
    target = fn.spec.policy.standby_per_node * sum(1 for n in nodes if len(n.gpus) >= need)
    if target == 0:
        return
    bar = _Bar("pre-warm", target, "standby", err)
    try:
        while True:
            insts = (await client.call("ListInstances", scheduler_pb2.ListInstancesRequest(function_id=fn.id))).instances
            ready = sum(1 for i in insts if i.revision == fn.revision and i.state == types_pb2.INSTANCE_STATE_STANDBY)
            bar.update(min(ready, target), target)
            if ready >= target:
                return
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(f"--wait-timeout: {ready}/{target} standby instances of {fn.id}")
            await asyncio.sleep(0.5)
    finally:
        bar.close()


# ---- commands -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapwake", description="Snapwake admin command line.")
    p.add_argument("--scheduler", help="host:port[,host:port...] of the schedulers "
                   f"(default: $SNAPWAKE_SCHEDULER, else {DEFAULT_SCHEDULER})")
    p.add_argument("--ca", type=Path, help="CA certificate (PEM) the scheduler's admin port is checked against "
                   "(default: $SNAPWAKE_CA, else the system's trusted roots)")
    p.add_argument("--plaintext", action="store_true", help="no TLS: only for a cluster run with --dev-plaintext")
    p.add_argument("--output", "-o", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    p.add_argument("--token-file", default="", help="file holding the admin bearer token "
                   "(default: $SNAPWAKE_TOKEN_FILE, else the token in $SNAPWAKE_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("deploy", help="create (or --update) a function from -f YAML/JSON and/or flags")
    d.add_argument("-f", "--file", type=Path, help="YAML or JSON file of FunctionSpec fields")
    d.add_argument("--update", action="store_true", help="update an existing function (new revision)")
    d.add_argument("--wait", action="store_true", help="show snapshot and pre-warm progress until done")
    d.add_argument("--wait-timeout", type=float, default=900.0, help="seconds --wait may take")
    for flag in _FLAGS:
        d.add_argument("--" + flag.replace("_", "-"), dest=flag, help=f"spec field {_FLAGS[flag]}")
    d.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--command", dest="cmd", nargs="+", help="replaces a user image's Entrypoint")
    d.add_argument("--args", help="replaces a user image's Cmd, one shell-quoted string "
                                  "(--args='--port 9000 --model /models/m')")
    sub.add_parser("list", help="list functions").add_argument("--tenant", default="")
    sub.add_parser("get", help="show one function").add_argument("function_id")
    sub.add_parser("delete", help="delete a function").add_argument("function_id")
    lg = sub.add_parser("logs", help="an instance's container output")
    lg.add_argument("instance_id")
    lg.add_argument("--tail-bytes", type=int, default=0)
    sub.add_parser("snapshots", help="list snapshots").add_argument("function_id", nargs="?", default="")
    sub.add_parser("nodes", help="list nodes")
    sub.add_parser("instances", help="list instances").add_argument("function_id", nargs="?", default="")
    node = sub.add_parser("node", help="cordon, drain or uncordon a node").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, text in (("cordon", "no new instances on NODE"),
                         ("drain", "cordon NODE and move its instances off it"),
                         ("uncordon", "lift NODE's cordon (and drain)")):
        a = node.add_parser(action, help=text)
        a.add_argument("node")
        if action != "uncordon":
            a.add_argument("--reason", default="", help="shown by 'snapwake nodes'")
    _access_parsers(sub)
    drain = node.choices["drain"]
    drain.add_argument("--no-wait", action="store_true", help="return once the drain is recorded")
    drain.add_argument("--wait-timeout", type=float, default=300.0, help="seconds the wait may take")
    return p


def _access_parsers(sub: Any) -> None:
    """``token``, ``apikey`` and ``quota`` (operator calls, but ``quota get`` of one's own tenant)."""
    tok = sub.add_parser("token", help="admin bearer tokens").add_subparsers(dest="action", required=True,
                                                                              metavar="ACTION")
    tc = tok.add_parser("create", help="a new token (printed once)")
    who = tc.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", default="", help="the tenant whose resources the token reaches")
    who.add_argument("--operator", action="store_true", help="an operator token (everything)")
    tc.add_argument("--description", default="")
    tok.add_parser("list", help="tokens, without their secrets")
    tok.add_parser("revoke", help="revoke a token by id").add_argument("id")
    key = sub.add_parser("apikey", help="gateway API keys").add_subparsers(dest="action", required=True,
                                                                            metavar="ACTION")
    kc = key.add_parser("create", help="a new key for TENANT (printed once)")
    kc.add_argument("tenant")
    kc.add_argument("--description", default="")
    kl = key.add_parser("list", help="keys, without their secrets")
    kl.add_argument("--prefix", default="", help="only ids starting with this")
    kl.add_argument("--tenant", default="")
    key.add_parser("revoke", help="revoke a key by id").add_argument("id")
    quota = sub.add_parser("quota", help="per-tenant quotas").add_subparsers(dest="action", required=True,
                                                                              metavar="ACTION")
    quota.add_parser("get", help="limits and use").add_argument("tenant", nargs="?", default="")
    qs = quota.add_parser("set", help="override limits (0: no limit; unset: the scheduler's default)")
    qs.add_argument("tenant")
    qs.add_argument("--functions", type=int)
    qs.add_argument("--standbys", type=int)
    qs.add_argument("--snapshot-bytes", type=parse_size, help="e.g. 200GiB")
    qs.add_argument("--gpu-memory", dest="gpu_memory_bytes", type=parse_size, help="e.g. 80GiB")


async def _access(client: AdminClient, args: argparse.Namespace) -> tuple[str, Any]:
    """The ``token``, ``apikey`` and ``quota`` commands."""
    c, a = args.command, args.action
    if c == "token" and a == "create":
        req = scheduler_pb2.CreateAdminTokenRequest(tenant=args.tenant, operator=args.operator,
                                                    description=args.description)
        return "created", await client.call("CreateAdminToken", req)
    if c == "token" and a == "list":
        return "tokens", await client.call("ListAdminTokens", scheduler_pb2.ListAdminTokensRequest())
    if c == "token":
        await client.call("RevokeAdminToken", scheduler_pb2.RevokeAdminTokenRequest(id=args.id))
        return "revoked", f"token {args.id}"
    if c == "apikey" and a == "create":
        req2 = scheduler_pb2.CreateApiKeyRequest(tenant=args.tenant, description=args.description)
        return "created", await client.call("CreateApiKey", req2)
    if c == "apikey" and a == "list":
        return "apikeys", await client.call("ListApiKeys", scheduler_pb2.ListApiKeysRequest(
            id_prefix=args.prefix, tenant=args.tenant))
    if c == "apikey":
        await client.call("RevokeApiKey", scheduler_pb2.RevokeApiKeyRequest(id=args.id))
        return "revoked", f"API key {args.id}"
    if a == "get":
        return "quota", await client.call("GetTenantQuota", scheduler_pb2.GetTenantQuotaRequest(tenant=args.tenant))
    limits = {f"max_{n}": getattr(args, n) for n in ("functions", "standbys", "snapshot_bytes", "gpu_memory_bytes")
              if getattr(args, n) is not None}
    if any(v < 0 for v in limits.values()):
        raise errors.InvalidArgument("quota limits must not be negative (0: no limit)")
    req3 = scheduler_pb2.SetTenantQuotaRequest(quota=scheduler_pb2.TenantQuota(tenant=args.tenant, **limits))
    return "quota", await client.call("SetTenantQuota", req3)


def _load_yaml(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise errors.InvalidArgument(f"-f: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise errors.InvalidArgument(f"-f: {path} is not valid YAML: {exc}".replace("\n", " ")) from None


async def _deploy(client: AdminClient, args: argparse.Namespace, err: TextIO) -> types_pb2.Function:
    spec = build_spec(_load_yaml(args.file), vars(args), args.env)
    if args.update:
        fn = (await client.call("UpdateFunction", scheduler_pb2.UpdateFunctionRequest(spec=spec))).function
    else:
        fn = (await client.call("CreateFunction", scheduler_pb2.CreateFunctionRequest(spec=spec))).function
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        if not is_builtin(fn.spec.image):
            fn = await _wait_validated(client, fn, deadline, err)
            _check_deployed(fn)
        elif fn.spec.policy.snapshot_mode != types_pb2.SNAPSHOT_MODE_NONE:
            fn = await _wait_snapshot(client, fn, deadline, err)
        await _wait_standby(client, fn, deadline, err)
        fn = (await client.call("GetFunction", scheduler_pb2.GetFunctionRequest(function_id=fn.id))).function
        _check_deployed(fn)
    err.write(_state_line(fn))
    return fn


async def _node(client: AdminClient, args: argparse.Namespace, err: TextIO) -> tuple[str, Any]:
    if args.action == "uncordon":
        await client.call("UncordonNode", scheduler_pb2.UncordonNodeRequest(node=args.node))
        return "uncordoned", args.node
    req = scheduler_pb2.CordonNodeRequest(node=args.node, drain=args.action == "drain", reason=args.reason)
    cordon = (await client.call("CordonNode", req)).cordon
    if args.action == "cordon":
        return "cordoned", cordon
    if args.no_wait:
        return "draining", cordon
    await _wait_drained(client, args.node, time.monotonic() + args.wait_timeout, err)
    return "drained", cordon


async def _wait_drained(client: AdminClient, node: str, deadline: float, err: TextIO) -> None:
    """Polls until no instance is left on ``node`` (ended ones aside)."""
    shown = -1
    while True:
        listed = (await client.call("ListInstances", scheduler_pb2.ListInstancesRequest())).instances
        left = sum(1 for i in listed if i.node == node and i.state not in GONE)
        if left == 0:
            return
        if left != shown:
            err.write(f"draining {node}: {left} instance{'s' if left > 1 else ''} left\n")
            shown = left
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded(f"node {node} still runs {left} instances; it stays cordoned "
                                          "and draining (run 'snapwake node drain' again to wait more)")
        await asyncio.sleep(0.5)


async def _run(client: AdminClient, args: argparse.Namespace, err: TextIO) -> tuple[str, Any]:
    """Runs one subcommand; returns (kind, message) for output."""
    c = args.command
    if c == "deploy":
        return "function", await _deploy(client, args, err)
    if c == "list":
        return "functions", await client.call("ListFunctions", scheduler_pb2.ListFunctionsRequest(tenant=args.tenant))
    if c == "get":
        req = scheduler_pb2.GetFunctionRequest(function_id=args.function_id)
        return "function", (await client.call("GetFunction", req)).function
    if c == "delete":
        await client.call("DeleteFunction", scheduler_pb2.DeleteFunctionRequest(function_id=args.function_id))
        return "deleted", args.function_id
    if c == "logs":
        req = scheduler_pb2.GetInstanceLogsRequest(instance_id=args.instance_id, tail_bytes=args.tail_bytes)
        return "logs", await client.call("GetInstanceLogs", req)
    if c == "snapshots":
        return "snapshots", await client.call("ListSnapshots", scheduler_pb2.ListSnapshotsRequest(function_id=args.function_id))
    if c == "nodes":
        return "nodes", await client.call("ListNodes", scheduler_pb2.ListNodesRequest())
    if c == "node":
        return await _node(client, args, err)
    if c in ("token", "apikey", "quota"):
        return await _access(client, args)
    return "instances", await client.call("ListInstances", scheduler_pb2.ListInstancesRequest(function_id=args.function_id))


# ---- output -------------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}Gi" if n else "-"


def _enum(value: int, enum: Any, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def _age(ts: Any) -> str:
    if not ts.seconds:
        return "-"
    s = int(datetime.now(UTC).timestamp() - ts.seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, like kubectl."""
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in cells)


def _rows(kind: str, value: Any) -> tuple[list[str], list[list[Any]]]:
    if kind in ("tokens", "apikeys", "quota"):
        return _access_rows(kind, value)
    if kind == "functions":
        return ["ID", "REV", "STATE", "IMAGE", "GPU MEM", "MIN/MAX", "MODE", "MESSAGE"], [
            [f.id, f.revision, _enum(f.state, types_pb2.FunctionState, "FUNCTION_STATE_"), f.spec.image or "-",
             _gib(f.spec.resources.gpu_memory_bytes), f"{f.spec.policy.min_instances}/{f.spec.policy.max_instances}",
             _enum(f.spec.policy.snapshot_mode, types_pb2.SnapshotMode, "SNAPSHOT_MODE_"), f.status_message]
            for f in value.functions]
    if kind == "instances":
        return ["ID", "FUNCTION", "REV", "NODE", "GPU", "MEM", "STATE", "ENDPOINT", "LAST START", "AGE"], [
            [i.id, i.function_id, i.revision, i.node or "-", i.gpu_index, _gib(i.gpu_memory_bytes),
             _enum(i.state, types_pb2.InstanceState, "INSTANCE_STATE_")
             + (" (cold)" if i.standby_tier == types_pb2.STANDBY_TIER_COLD else ""), i.endpoint or "-",
             f"{i.last_start_seconds:.3f}s" if i.last_start_seconds else "-", _age(i.create_time)]
            for i in value.instances]
    if kind == "nodes":
        cordons = {c.node: c for c in value.cordons}
        return ["NAME", "STATE", "ADDRESS", "BLOBSTORE", "GPUS (reserved/total)", "CACHED", "HEARTBEAT"], [
            [n.name, _node_state(cordons.get(n.name)), n.address, n.blobstore_address or "-",
             " ".join(f"{g.index}:{_gib(g.memory_reserved_bytes)}/{_gib(g.memory_total_bytes)}" for g in n.gpus)
             or "-", len(n.cached_snapshots), _age(n.heartbeat_time)] for n in value.nodes]
    return ["ID", "STATE", "PROGRESS", "SIZE", "DISK", "CACHE", "ATTEMPTS", "MESSAGE"], [
        [s.id, _enum(s.state, types_pb2.SnapshotState, "SNAPSHOT_STATE_"),
         f"{100 * s.bytes_written // s.total_bytes}%" if s.total_bytes else "-", _gib(s.total_bytes),
         ",".join(s.disk_nodes) or "-", ",".join(s.cache_nodes) or "-", s.attempts, s.message]
        for s in value.snapshots]


def _access_rows(kind: str, value: Any) -> tuple[list[str], list[list[Any]]]:
    if kind == "tokens":
        return ["ID", "TENANT", "OPERATOR", "DESCRIPTION", "AGE"], [
            [t.id, t.tenant or "-", "yes" if t.operator else "no", t.description, _age(t.create_time)]
            for t in value.tokens]
    if kind == "apikeys":
        return ["ID", "TENANT", "DESCRIPTION", "AGE"], [
            [k.id, k.tenant, k.description, _age(k.create_time)] for k in value.keys]
    names = ("functions", "standbys", "snapshot_bytes", "gpu_memory_bytes")
    usage = value.usage if isinstance(value, scheduler_pb2.GetTenantQuotaResponse) else None
    return ["QUOTA", "LIMIT", "IN USE"], [
        [n, getattr(value.quota, f"max_{n}") or "no limit", getattr(usage, n) if usage is not None else "-"]
        for n in names]


def _node_state(cordon: types_pb2.NodeCordon | None) -> str:
    if cordon is None:
        return "Ready"
    return ("Draining" if cordon.drain else "Cordoned") + (f" ({cordon.reason})" if cordon.reason else "")


def _to_json(value: Any) -> Any:
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return value


def render(kind: str, value: Any, output: str) -> str:
    """The text printed on stdout for a result."""
    if output == "json":
        return json.dumps({kind: value} if kind in ("deleted", "uncordoned", "revoked") else _to_json(value),
                          indent=2) + "\n"
    if kind == "deleted":
        return f"deleted {value}\n"
    if kind == "uncordoned":
        return f"node {value} uncordoned\n"
    if kind == "revoked":
        return f"{value} revoked\n"
    if kind == "created":
        record = value.token if isinstance(value, scheduler_pb2.CreateAdminTokenResponse) else value.key
        return (f"id: {record.id}\nsecret (shown once, stored nowhere): {value.secret}\n")
    if kind in ("cordoned", "draining", "drained"):
        return f"node {value.node} {kind}\n"
    if kind == "logs":
        return value.logs
    if kind == "function":
        return yaml.safe_dump(_to_json(value), sort_keys=False)
    return table(*_rows(kind, value))


def _exit_code(exc: errors.SnapwakeError) -> int:
    return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)


def _tls(args: argparse.Namespace) -> ClientTls | None:
    if args.plaintext:
        return None
    ca = args.ca or (Path(os.environ["SNAPWAKE_CA"]) if os.environ.get("SNAPWAKE_CA") else None)
    if ca is None:
        return ClientTls(ca=b"")  # gRPC's default roots
    try:
        return ClientTls(ca=ca.read_bytes())
    except OSError as exc:
        raise errors.InvalidArgument(f"--ca: cannot read {ca}: {exc.strerror}", field="ca") from None


def _token(path: str, value: str) -> str:
    """The bearer token from the file at ``path``, else ``value``."""
    if not path:
        return value.strip()
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise errors.InvalidArgument(f"--token-file: cannot read {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``snapwake``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem
        return int(exc.code or 0)
    addresses = args.scheduler or os.environ.get("SNAPWAKE_SCHEDULER") or DEFAULT_SCHEDULER
    try:
        token = _token(args.token_file or os.environ.get("SNAPWAKE_TOKEN_FILE", ""),
                       os.environ.get("SNAPWAKE_TOKEN", ""))
        client = AdminClient([a.strip() for a in addresses.split(",") if a.strip()], args.timeout, token, _tls(args))
        kind, value = asyncio.run(_run(client, args, sys.stderr))
    except DeployFailed as exc:  # the node's reason keeps its lines: it ends with the container's output
        print(f"snapwake: {exc.message}", file=sys.stderr)
        return _exit_code(exc)
    except errors.SnapwakeError as exc:
        name = "error" if type(exc) is errors.SnapwakeError else type(exc).__name__
        print(f"snapwake: {name}: {exc.message}".replace("\n", " "), file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("snapwake: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(render(kind, value, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
