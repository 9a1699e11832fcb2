"""The host side of a trimmed release (``modelserver.instance.trim_host``)."""

from __future__ import annotations

import gc
import weakref

from modelserver.instance import trim_host


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def test_trim_host_frees_reference_cycles() -> None:
    gc.disable()
    try:
        node = _Node()
        ref = weakref.ref(node)
        del node
        assert ref() is not None  # the cycle outlives its last name
        assert trim_host() >= 1
        assert ref() is None
    finally:
        gc.enable()
