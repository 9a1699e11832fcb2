"""Validation and defaulting of ``FunctionSpec`` (pure).

``normalize`` returns a new spec with every default filled in, or raises ``InvalidArgument``
naming the first bad field (``spec.policy.max_instances``). The scheduler does not look at
files: it may run on another host, so a missing ``config.json`` is the node's start failure.
"""

from __future__ import annotations

import json
import re

from google.protobuf.duration_pb2 import Duration

from snapwake.envkeys import forbidden_env_key
from snapwake.errors import InvalidArgument
from snapwake.imageref import BUILTIN as BUILTIN_IMAGE
from snapwake.imageref import is_builtin
from snapwake.imageref import parse as parse_image
from snapwake.v1.types_pb2 import FunctionSpec, SnapshotMode

__all__ = ["BUILTIN_IMAGE", "DEFAULT_SAMPLE_REQUEST", "check_tenant", "function_id", "normalize", "split_function_id",
           "validated_at_deploy"]

DEFAULT_SAMPLE_REQUEST = json.dumps(
    {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1})
_PART = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
# A model id ("Qwen/Qwen2.5-0.5B-Instruct") or the path a server names its model by when given
# no other name (vLLM and `transformers serve` do: "/models/llama-8b").
_SERVED_NAME = re.compile(r"(?!.*//)(?!.*/\.\.?(/|$))[A-Za-z0-9/][A-Za-z0-9._:/@+-]{0,255}")
_SECRET = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
# Upper bounds catch typos (an idle_timeout in milliseconds, a max of 1e6) before they bite.
_MAX_INSTANCES = 1000
_MAX_CONCURRENCY = 1024
_MAX_QUEUE_LEN = 100_000
_MAX_DURATION_S = 24 * 3600
_MAX_CHAT_TEMPLATE = 64 << 10


def _check_part(value: str, field: str) -> None:
    if not _PART.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} must be 1-63 chars of [a-z0-9-], starting and ending alphanumeric",
            field=field)


def check_tenant(tenant: str, field: str = "tenant") -> str:
    """``tenant`` if it is a valid tenant name (the first part of a function id)."""
    _check_part(tenant, field)
    return tenant


def split_function_id(fid: str, field: str = "function_id") -> tuple[str, str, str]:
    """Splits and checks ``tenant/namespace/name``."""
    parts = fid.split("/")
    if len(parts) != 3:
        raise InvalidArgument(f"{field} {fid!r} must be tenant/namespace/name", field=field)
    for part in parts:
        _check_part(part, field)
    return parts[0], parts[1], parts[2]


def function_id(spec: FunctionSpec) -> str:
    return f"{spec.tenant}/{spec.namespace}/{spec.name}"


def _seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _duration(d: Duration, default_s: int, field: str) -> None:
    if d.seconds == 0 and d.nanos == 0:
        d.FromSeconds(default_s)
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        raise InvalidArgument(f"{field} must be a positive duration", field=field)
    if _seconds(d) > _MAX_DURATION_S:
        raise InvalidArgument(f"{field} must be at most {_MAX_DURATION_S}s", field=field)


def _bounded(value: int, low: int, high: int, field: str) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}, got {value}", field=field)


def _identity(spec: FunctionSpec) -> None:
    spec.tenant = spec.tenant or "default"
    spec.namespace = spec.namespace or "default"
    if not spec.name:
        raise InvalidArgument("spec.name is required", field="spec.name")
    for field in ("tenant", "namespace", "name"):
        _check_part(getattr(spec, field), f"spec.{field}")


def _image(spec: FunctionSpec) -> None:
    spec.image = spec.image or BUILTIN_IMAGE
    if is_builtin(spec.image):
        _builtin_only(spec)
    else:
        _user_image(spec)
    if any(not part for part in spec.command):
        raise InvalidArgument("spec.command must not contain empty arguments", field="spec.command")
    for field in ("command", "args"):
        if any("\0" in part for part in getattr(spec, field)):
            raise InvalidArgument(f"spec.{field} must not contain NUL characters", field=f"spec.{field}")
    # A NUL cannot be in a path, an argv or an environment string: refused here, not at exec.
    if "\0" in spec.model_dir:
        raise InvalidArgument("spec.model_dir must not contain NUL characters", field="spec.model_dir")
    spec.http_port = spec.http_port or 8000
    _bounded(spec.http_port, 1, 65535, "spec.http_port")
    if is_builtin(spec.image):
        spec.health_path = spec.health_path or "/health"
    # Empty for a user image: the node probes /health, then /v1/models (types.proto).
    if spec.health_path and not _PATH.fullmatch(spec.health_path):
        raise InvalidArgument("spec.health_path must start with '/' and hold no spaces or control characters",
                              field="spec.health_path")
    spec.sample_request = spec.sample_request or DEFAULT_SAMPLE_REQUEST
    _sample_request(spec.sample_request)
    for key in sorted(spec.env):
        if not _ENV.fullmatch(key):
            raise InvalidArgument(f"spec.env key {key!r} is not a valid variable name", field="spec.env")
        why = forbidden_env_key(key)
        if why is not None:
            raise InvalidArgument(f"spec.env: {key} may not be set (it steers {why})", field="spec.env")
        if "\0" in spec.env[key]:
            raise InvalidArgument(f"spec.env: the value of {key} must not contain NUL characters", field="spec.env")


def _builtin_only(spec: FunctionSpec) -> None:
    if not spec.model_dir or not spec.model_dir.startswith("/"):
        raise InvalidArgument("spec.model_dir must be an absolute path for the builtin image",
                              field="spec.model_dir")
    for field in ("command", "args", "served_model_name", "registry_secret"):
        if getattr(spec, field):
            raise InvalidArgument(f"spec.{field} must be empty for the builtin image", field=f"spec.{field}")
    if spec.chat_template:
        _chat_template(spec.chat_template)


def _chat_template(text: str) -> None:
    """A chat template override must be a Jinja template the model server can compile."""
    if len(text.encode()) > _MAX_CHAT_TEMPLATE or "\0" in text:
        raise InvalidArgument(f"spec.chat_template must be at most {_MAX_CHAT_TEMPLATE} bytes without NUL",
                              field="spec.chat_template")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise InvalidArgument(f"spec.chat_template is not a valid Jinja template: {exc.message} (line {exc.lineno})",
                              field="spec.chat_template") from exc


def _user_image(spec: FunctionSpec) -> None:
    parse_image(spec.image)
    if spec.chat_template:
        raise InvalidArgument("spec.chat_template is for the builtin image; a user image uses its own",
                              field="spec.chat_template")
    if spec.model_dir and not spec.model_dir.startswith("/"):
        raise InvalidArgument("spec.model_dir must be an absolute path (or empty for a user image)",
                              field="spec.model_dir")
    if spec.served_model_name and not _SERVED_NAME.fullmatch(spec.served_model_name):
        raise InvalidArgument(f"spec.served_model_name {spec.served_model_name!r} must be 1-256 characters of "
                              "[A-Za-z0-9._:/@+-], starting with a letter, digit or /", field="spec.served_model_name")
    if spec.registry_secret and not _SECRET.fullmatch(spec.registry_secret):
        raise InvalidArgument("spec.registry_secret must name a credential the operator registered (1-253 "
                              "chars of [a-z0-9.-], starting and ending alphanumeric), never hold one",
                              field="spec.registry_secret")


def _sample_request(text: str) -> None:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"spec.sample_request is not JSON: {exc}", field="spec.sample_request") from exc
    except RecursionError:
        raise InvalidArgument("spec.sample_request: JSON nested too deep", field="spec.sample_request") from None
    if not isinstance(body, dict):
        raise InvalidArgument("spec.sample_request must be a JSON object", field="spec.sample_request")
    if "model" in body and not isinstance(body["model"], str):
        raise InvalidArgument("spec.sample_request model must be a string", field="spec.sample_request")


def _resources(spec: FunctionSpec) -> None:
    r = spec.resources
    # Multi-GPU instances need tensor parallelism in the model server; refuse rather than misplace.
    _bounded(r.gpu_count, 0, 1, "spec.resources.gpu_count")
    if r.gpu_count and not r.gpu_memory_bytes:
        raise InvalidArgument("spec.resources.gpu_memory_bytes is required when gpu_count is 1",
                              field="spec.resources.gpu_memory_bytes")
    r.cpu_millis = r.cpu_millis or 1000
    _bounded(r.cpu_millis, 1, 1_024_000, "spec.resources.cpu_millis")


def _policy(spec: FunctionSpec) -> None:
    had_policy = spec.HasField("policy")
    p = spec.policy
    builtin = is_builtin(spec.image)
    if p.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_UNSPECIFIED:
        # A user image is checkpointed whole: nothing inside it cooperates with the platform.
        p.snapshot_mode = SnapshotMode.SNAPSHOT_MODE_ARENA if builtin else SnapshotMode.SNAPSHOT_MODE_PROCESS
    if p.snapshot_mode not in SnapshotMode.values():
        raise InvalidArgument(f"spec.policy.snapshot_mode {p.snapshot_mode} is unknown",
                              field="spec.policy.snapshot_mode")
    if p.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_ARENA and not builtin:
        raise InvalidArgument("spec.policy.snapshot_mode ARENA needs the builtin image",
                              field="spec.policy.snapshot_mode")
    p.max_instances = p.max_instances or 4
    _bounded(p.max_instances, 1, _MAX_INSTANCES, "spec.policy.max_instances")
    _bounded(p.min_instances, 0, p.max_instances, "spec.policy.min_instances")
    no_snapshot = p.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_NONE
    # 0 is a real choice for standbys, so the default applies only when no policy was given.
    if not had_policy and not no_snapshot:
        p.standby_per_node = 1
    if no_snapshot and p.standby_per_node:
        raise InvalidArgument("spec.policy.standby_per_node must be 0 when snapshot_mode is NONE",
                              field="spec.policy.standby_per_node")
    _bounded(p.standby_per_node, 0, 64, "spec.policy.standby_per_node")
    p.concurrency = p.concurrency or 4
    _bounded(p.concurrency, 1, _MAX_CONCURRENCY, "spec.policy.concurrency")
    p.queue_len = p.queue_len or 64
    _bounded(p.queue_len, 1, _MAX_QUEUE_LEN, "spec.policy.queue_len")
    _duration(p.queue_timeout, 30, "spec.policy.queue_timeout")
    _duration(p.idle_timeout, 300, "spec.policy.idle_timeout")
    _duration(p.start_timeout, 120, "spec.policy.start_timeout")


def normalize(spec: FunctionSpec) -> FunctionSpec:
    """Returns a validated copy of ``spec`` with defaults filled in; raises ``InvalidArgument``."""
    out = FunctionSpec()
    out.CopyFrom(spec)
    _identity(out)
    _image(out)
    _resources(out)
    _policy(out)
    return out


def validated_at_deploy(spec: FunctionSpec) -> bool:
    """Whether a revision of ``spec`` is PENDING until a node built it: an arena snapshot, or a
    user image (pulled, started, probed and warmed up once before it is called READY)."""
    return spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_ARENA or not is_builtin(spec.image)


def seconds(d: Duration) -> float:
    """A ``Duration`` as float seconds."""
    return _seconds(d)
