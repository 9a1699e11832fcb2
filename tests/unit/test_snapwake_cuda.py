"""snapwake.cuda: the one CUDA result check, with fake result tuples (no GPU, no driver)."""

from __future__ import annotations

import asyncio
import enum
import types
from typing import Any

import grpc
import pytest

from services.nodeagent.gpu import CudaCheckpointer
from snapwake import cuda, errors


class FakeResult(enum.IntEnum):
    """The CUresult members these tests need (cuda.bindings' values)."""

    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_SUPPORTED = 801


OK = FakeResult.CUDA_SUCCESS


@pytest.mark.parametrize(("result", "value"), [
    ((OK,), None),
    (OK, None),  # a bare CUresult, as some bindings return
    ((OK, 7), 7),
    ((OK, "handle"), "handle"),
    ((OK, 1, 2), (1, 2)),
])
def test_success_unwraps_the_values(result: Any, value: Any) -> None:
    assert cuda.check(result, "cuSomething") == value


@pytest.mark.parametrize(("result", "name", "code", "http_status", "openai_type"), [
    (FakeResult.CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", grpc.StatusCode.RESOURCE_EXHAUSTED, 429,
     "rate_limit_error"),
    (FakeResult.CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", grpc.StatusCode.UNAVAILABLE, 503,
     "service_unavailable"),
    (FakeResult.CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", grpc.StatusCode.UNAVAILABLE, 503,
     "service_unavailable"),
])
def test_failure_raises_one_error_naming_the_call_and_the_result(
        result: FakeResult, name: str, code: grpc.StatusCode, http_status: int, openai_type: str) -> None:
    with pytest.raises(cuda.CudaError) as caught:
        cuda.check((result, None), "cuMemCreate(4096) on gpu 1")
    exc = caught.value
    assert isinstance(exc, errors.SnapwakeError)
    assert (exc.call, exc.result, exc.out_of_memory) == ("cuMemCreate(4096) on gpu 1", name, name == cuda.OUT_OF_MEMORY)
    assert exc.message == f"cuMemCreate(4096) on gpu 1 failed: {name}"
    assert (errors.to_grpc_code(exc), exc.http_status, exc.openai_type) == (code, http_status, openai_type)
    assert errors.grpc_details(exc) == exc.message  # no start-failed tag


def test_the_real_bindings_results_are_checked_the_same() -> None:
    cu = pytest.importorskip("cuda.bindings.driver")  # the enum imports without a driver or GPU
    assert cuda.check((cu.CUresult.CUDA_SUCCESS, 3), "cuDeviceGetCount") == 3
    with pytest.raises(cuda.CudaError, match="^cuMemMap failed: CUDA_ERROR_OUT_OF_MEMORY$") as caught:
        cuda.check((cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY,), "cuMemMap")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeDriver(types.SimpleNamespace):
    """The checkpoint calls of ``cuda.bindings.driver``; ``fail`` maps a call name to its result."""

    def __init__(self, fail: dict[str, FakeResult]) -> None:
        super().__init__(CUcheckpointLockArgs=types.SimpleNamespace, CUcheckpointCheckpointArgs=object,
                         CUcheckpointRestoreArgs=object, CUcheckpointUnlockArgs=object)
        self.calls: list[str] = []
        for name in ("cuInit", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                     "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"):
            setattr(self, name, self._call(name, fail.get(name, OK)))

    def _call(self, name: str, result: FakeResult) -> Any:
        def call(*args: Any) -> tuple[FakeResult]:
            self.calls.append(name)
            return (result,)
        return call


def test_a_failed_checkpoint_unlocks_the_process_and_names_the_call_and_pid() -> None:
    cu = FakeDriver({"cuCheckpointProcessCheckpoint": FakeResult.CUDA_ERROR_OUT_OF_MEMORY})
    with pytest.raises(cuda.CudaError, match=r"^cuCheckpointProcessCheckpoint\(4242\) failed: CUDA_ERROR_OUT_OF_MEMORY$"):
        asyncio.run(CudaCheckpointer(cu=cu).checkpoint(4242))
    assert cu.calls == ["cuInit", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                        "cuCheckpointProcessUnlock"]


def test_a_failed_restore_is_unavailable_naming_the_call_and_pid() -> None:
    cu = FakeDriver({"cuCheckpointProcessRestore": FakeResult.CUDA_ERROR_INVALID_VALUE})
    checkpointer = CudaCheckpointer(cu=cu)
    assert asyncio.run(checkpointer.checkpoint(7)) >= 0
    with pytest.raises(cuda.CudaError, match=r"^cuCheckpointProcessRestore\(7\) failed") as caught:
        asyncio.run(checkpointer.restore(7))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
