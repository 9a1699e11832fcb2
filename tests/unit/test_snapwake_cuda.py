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
    CUDA_ERROR_NOT_INITIALIZED = 3
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


class GroupDriver(FakeDriver):
    """FakeDriver with per-pid answers: ``cuda`` are the CUDA processes, ``fail`` maps
    (call, pid) to a failed result; calls are recorded with their pid."""

    def __init__(self, cuda_pids: set[int], fail: dict[tuple[str, int], FakeResult] | None = None) -> None:
        super().__init__({})
        self.cuda_pids, self.fail, self.pid_calls = cuda_pids, fail or {}, []
        for name in ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                     "cuCheckpointProcessUnlock"):
            setattr(self, name, self._pid_call(name))

    def _pid_call(self, name: str) -> Any:
        def call(pid: int, *args: Any) -> tuple[FakeResult]:
            self.pid_calls.append((name.removeprefix("cuCheckpointProcess"), pid))
            return (self.fail.get((name, pid), OK),)
        return call

    def cuCheckpointProcessGetState(self, pid: int) -> tuple[FakeResult, int | None]:  # noqa: N802 - the driver's name
        return (OK, 0) if pid in self.cuda_pids else (FakeResult.CUDA_ERROR_NOT_INITIALIZED, None)


def test_a_group_checkpoint_takes_only_cuda_processes_locking_all_first() -> None:
    cu = GroupDriver({10, 12})
    checkpointer = CudaCheckpointer(cu=cu)
    assert asyncio.run(checkpointer.checkpoint_all([10, 11, 12])) == (10, 12)  # 11 has no CUDA
    assert cu.pid_calls == [("Lock", 10), ("Lock", 12), ("Checkpoint", 10), ("Checkpoint", 12)]
    cu.pid_calls.clear()
    assert asyncio.run(checkpointer.restore_all((10, 12))) >= 0
    assert cu.pid_calls == [("Restore", 10), ("Restore", 12), ("Unlock", 10), ("Unlock", 12)]


def test_a_failed_group_checkpoint_leaves_nothing_checkpointed_or_locked_and_names_the_process() -> None:
    cu = GroupDriver({10, 12}, {("cuCheckpointProcessCheckpoint", 12): FakeResult.CUDA_ERROR_NOT_SUPPORTED})
    with pytest.raises(cuda.CudaError, match=r"could not checkpoint pid 12 \(\?\), one of 2 CUDA processes of the "
                                             r"container: CUDA_ERROR_NOT_SUPPORTED \(processes that share GPU "
                                             r"memory through CUDA IPC"):
        asyncio.run(CudaCheckpointer(cu=cu).checkpoint_all([10, 12]))
    assert cu.pid_calls == [("Lock", 10), ("Lock", 12), ("Checkpoint", 10), ("Checkpoint", 12),
                            ("Restore", 10), ("Unlock", 10), ("Unlock", 12)]


def test_a_group_checkpoint_refuses_a_process_someone_else_holds() -> None:
    cu = GroupDriver({10})
    cu.cuCheckpointProcessGetState = lambda pid: (OK, 2)  # CHECKPOINTED already
    with pytest.raises(cuda.CudaError, match=r"not RUNNING"):
        asyncio.run(CudaCheckpointer(cu=cu).checkpoint_all([10]))
    assert cu.pid_calls == []


def test_a_container_without_cuda_processes_checkpoints_nothing() -> None:
    cu = GroupDriver(set())
    assert asyncio.run(CudaCheckpointer(cu=cu).checkpoint_all([5, 6])) == ()
    assert cu.pid_calls == []
