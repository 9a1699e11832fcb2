"""The CUDA driver API's one edge: the lazy import of its bindings and the one result check.

Every ``cuda.bindings.driver`` call returns ``(CUresult, *values)``; ``check`` unwraps it and
turns a failure into ``CudaError``, here and nowhere else::

    SnapwakeError
     +-- CudaError   (``call`` names the call, ``result`` the CUresult; out of memory has
                      ResourceExhausted's codes, any other failure Unavailable's)

``cuda.bindings`` is imported only when ``driver()`` is called, so this module (and those that
use it) imports on hosts without the NVIDIA driver or cuda-python.
"""

from __future__ import annotations

from typing import Any

from snapwake import errors

__all__ = ["OUT_OF_MEMORY", "CudaError", "check", "driver"]

SUCCESS = 0  # CUresult.CUDA_SUCCESS
OUT_OF_MEMORY = "CUDA_ERROR_OUT_OF_MEMORY"


class CudaError(errors.SnapwakeError):
    """A CUDA driver call failed.

    Out of memory answers as ``ResourceExhausted`` does (gRPC RESOURCE_EXHAUSTED, HTTP 429: retry
    with less, or elsewhere); any other result as ``Unavailable`` (UNAVAILABLE, 503)."""

    def __init__(self, call: str, result: str) -> None:
        super().__init__(f"{call} failed: {result}")
        self.call = call
        self.result = result
        like = errors.ResourceExhausted if self.out_of_memory else errors.Unavailable
        self.code, self.http_status, self.openai_type = like.code, like.http_status, like.openai_type

    @property
    def out_of_memory(self) -> bool:
        return self.result == OUT_OF_MEMORY


def driver() -> Any:
    """The ``cuda.bindings.driver`` module (imported on first use)."""
    from cuda.bindings import driver as cu

    return cu


def check(result: Any, what: str) -> Any:
    """Unwraps a driver call's ``(CUresult, *values)``: None, the one value, or a tuple of them.

    A failure raises ``CudaError`` with ``what`` (the call, with any arguments worth naming)
    and the result's name."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != SUCCESS:
        raise CudaError(what, str(getattr(status, "name", status)))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
