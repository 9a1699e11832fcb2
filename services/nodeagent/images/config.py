"""What an OCI image config says about running it, and Docker's rules for its command.

``parse_config`` reads the image config JSON (``config.Entrypoint``, ``Cmd``, ``Env``,
``WorkingDir``, ``User``, ``ExposedPorts``, plus ``os``/``architecture``); ``command`` joins it
with a function's overrides the way ``docker run --entrypoint`` and Kubernetes' command/args do.
Both are pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapwake import errors

__all__ = ["ImageConfig", "command", "parse_config"]

_FIELD = "spec.image"


@dataclass(frozen=True)
class ImageConfig:
    """The run-time parts of an image config."""

    # Prepended to every command; () when the image sets none.
    entrypoint: tuple[str, ...] = ()
    # Default arguments (or the whole command when there is no entrypoint).
    cmd: tuple[str, ...] = ()
    # The image's environment, later entries winning as in Docker.
    env: dict[str, str] = field(default_factory=dict)
    # The process's cwd; "" means "/".
    working_dir: str = ""
    # "", "name", "uid", "name:group", "uid:gid"... as the image says (see ``user.resolve_user``).
    user: str = ""
    # TCP ports the image declares, sorted (UDP ports are left out: we only probe HTTP).
    exposed_ports: tuple[int, ...] = ()
    # The platform it was built for, as Go names it ("linux", "amd64").
    os: str = "linux"
    architecture: str = ""


def parse_config(raw: bytes | str | Mapping[str, Any]) -> ImageConfig:
    """Parses the OCI image config; raises ``InvalidArgument`` (``spec.image``) when malformed."""
    try:
        doc = json.loads(raw) if isinstance(raw, bytes | str) else raw
    except ValueError as exc:
        raise _malformed(f"not JSON ({exc})") from None
    if not isinstance(doc, Mapping):
        raise _malformed("not a JSON object")
    run = {} if doc.get("config") is None else doc["config"]
    if not isinstance(run, Mapping):
        raise _malformed("config is not an object")
    return ImageConfig(entrypoint=_strings(run, "Entrypoint"), cmd=_strings(run, "Cmd"), env=_env(run),
                       working_dir=_string(run, "WorkingDir"), user=_string(run, "User"),
                       exposed_ports=_ports(run), os=_string(doc, "os") or "linux",
                       architecture=_string(doc, "architecture"))


def command(config: ImageConfig, override_command: Sequence[str] = (),
            override_args: Sequence[str] = ()) -> list[str]:
    """The container's argv: a command override replaces the entrypoint and drops the image's
    Cmd; an args override replaces the Cmd. Raises ``InvalidArgument`` when nothing is left."""
    _check_strings("spec.command", override_command)
    _check_strings("spec.args", override_args)
    if override_command:
        argv = [*override_command, *override_args]
    else:
        argv = [*config.entrypoint, *(override_args or config.cmd)]
    if not argv or not argv[0]:
        raise errors.InvalidArgument(f"{_FIELD}: image has no command (it sets neither Entrypoint nor Cmd); "
                                     "give the function a command", field=_FIELD)
    return argv


def _check_strings(name: str, values: Sequence[str]) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str) or "\0" in value:
            raise errors.InvalidArgument(f"{name}.{i}: must be a string without NUL", field=f"{name}.{i}")


def _string(doc: Mapping[str, Any], key: str) -> str:
    value = "" if doc.get(key) is None else doc[key]
    if not isinstance(value, str):
        raise _malformed(f"{key} is not a string")
    return value


def _strings(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = [] if doc.get(key) is None else doc[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _malformed(f"{key} is not a list of strings")
    return tuple(value)


def _env(doc: Mapping[str, Any]) -> dict[str, str]:
    # An entry without "=" cannot be set in a container (OCI wants KEY=VALUE): skipped.
    pairs = [entry.partition("=") for entry in _strings(doc, "Env")]
    return {key: value for key, sep, value in pairs if sep and key}


def _ports(doc: Mapping[str, Any]) -> tuple[int, ...]:
    declared = {} if doc.get("ExposedPorts") is None else doc["ExposedPorts"]
    if not isinstance(declared, Mapping):
        raise _malformed("ExposedPorts is not an object")
    ports = set()
    for key in declared:
        number, _, proto = str(key).partition("/")
        if not number.isdigit() or not 0 < int(number) < 65536 or proto not in ("", "tcp", "udp", "sctp"):
            raise _malformed(f"bad exposed port {key!r}")
        if proto in ("", "tcp"):
            ports.add(int(number))
    return tuple(sorted(ports))


def _malformed(why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{_FIELD}: image config is malformed: {why}", field=_FIELD)
