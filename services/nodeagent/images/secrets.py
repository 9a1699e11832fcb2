"""Registry credentials by reference: a function names a secret, the operator registered the
secret's auth file (``containers-auth.json(5)``, what ``skopeo login --authfile`` writes) on each
node as ``{secrets_dir}/{name}.json``. Only the name travels in specs and messages."""

from __future__ import annotations

import re
from pathlib import Path

from snapwake import errors

__all__ = ["FIELD", "authfile"]

FIELD = "spec.registry_secret"
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?")


def authfile(secrets_dir: Path | None, name: str) -> Path:
    """The auth file of secret ``name``; ``InvalidArgument`` for a name that is not one (no
    paths), ``FailedPrecondition`` when this node has no such secret."""
    if not _NAME.fullmatch(name):
        raise errors.InvalidArgument(f"{FIELD}: bad secret name {name[:80]!r} (lowercase letters, digits, "
                                     "'.', '_', '-'; at most 63)", field=FIELD)
    if secrets_dir is None:
        raise errors.FailedPrecondition(f"{FIELD}: secret {name!r} is not registered: this node has no "
                                        "registry secrets configured", field=FIELD)
    path = Path(secrets_dir) / f"{name}.json"
    if not path.is_file():
        raise errors.FailedPrecondition(f"{FIELD}: secret {name!r} is not registered on this node", field=FIELD)
    return path
