"""What the node itself checks in a spec before anything of it reaches a container (pure but
for ``os.path.realpath`` and ``os.stat``).

The scheduler validates a spec's shape but reads no files (it may run elsewhere), so only the
node can tell where ``model_dir`` really leads: it must resolve, symlinks followed, below one of
the operator's ``model_roots`` and outside the node's own state (instance dirs, the handover
socket), and be readable by the container's unprivileged user. Env keys that steer the loader
or an interpreter are refused here too (``snapwake.envkeys``, shared with the scheduler), so a
spec that reached the node some other way is held to the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from snapwake import errors
from snapwake.envkeys import forbidden_env_key

__all__ = ["check_env", "resolve_model_dir"]


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_model_dir(model_dir: str, roots: Iterable[str], private: Iterable[str]) -> str:
    """The real path of ``model_dir`` when it is allowed; InvalidArgument naming
    ``spec.model_dir`` when it is not."""
    def refuse(why: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"spec.model_dir: {model_dir!r} {why}", field="spec.model_dir")

    if not model_dir.startswith("/") or ".." in PurePosixPath(model_dir).parts or "\0" in model_dir:
        raise refuse("must be an absolute path without '..' or NUL")
    real = os.path.realpath(model_dir)
    real_roots = [os.path.realpath(r) for r in roots]
    if real == "/" or not any(_below(real, r) for r in real_roots if r != "/"):
        raise refuse(f"resolves to {real}, which is not below this node's model roots "
                     f"({', '.join(real_roots) or 'none configured'})")
    if any(_below(real, os.path.realpath(p)) or _below(os.path.realpath(p), real) for p in private):
        raise refuse(f"resolves to {real}, which holds or is inside this node's own state")
    if not os.path.isdir(real):
        raise refuse("is not a directory on this node")
    if os.stat(real).st_mode & 0o005 != 0o005:
        raise refuse("must be readable and searchable by others (o+rx): containers run as an unprivileged user")
    unreadable = _unreadable_entry(real)
    if unreadable is not None:
        raise refuse(f"holds {unreadable}, which others cannot read: containers run as an unprivileged user "
                     "(safetensors writes its shards 0600; chmod -R o+rX the model dir)")
    return real


def _unreadable_entry(real: str, limit: int = 4096) -> str | None:
    """The first file (o+r) or dir (o+rx) of ``real``'s top level that others cannot use, or
    None: the usual trap is shards saved 0600, which the container's mapped ids cannot open.
    Only the first ``limit`` entries are looked at, so a huge dir costs little."""
    with os.scandir(real) as entries:
        for n, entry in enumerate(entries):
            if n >= limit:
                break
            try:
                st = entry.stat()  # through links: what the container would open
            except OSError:
                continue  # a dangling link fails in the container with its own clear error
            need = 0o005 if entry.is_dir() else 0o004
            if st.st_mode & need != need:
                return f"{entry.name} (mode {st.st_mode & 0o777:04o})"
    return None


def check_env(env: Mapping[str, str]) -> None:
    """InvalidArgument naming the first key of ``env`` that a spec may not set."""
    for key in sorted(env):
        why = forbidden_env_key(key)
        if why is not None:
            raise errors.InvalidArgument(f"spec.env: {key} may not be set (it steers {why})", field="spec.env")
