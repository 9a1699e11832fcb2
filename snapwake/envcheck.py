"""Environment variables a function's spec may not set (pure; the scheduler refuses them at
deploy, the nodeagent once more before a start).

The dynamic loader's and Python's own variables (``LD_PRELOAD``, ``PYTHONPATH``, ...) change
what code runs before the server's own, and the platform sets its own ``SNAPWAKE_*`` and GPU
visibility variables: a spec that names one is refused rather than silently overridden.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["refused_env_keys"]

_PREFIXES = ("LD_", "PYTHON", "SNAPWAKE_")
_NAMES = frozenset({"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"})


def refused_env_keys(keys: Iterable[str]) -> list[str]:
    """The keys of ``keys`` a spec may not set, sorted."""
    return sorted(k for k in set(keys) if k.upper().startswith(_PREFIXES) or k.upper() in _NAMES)
