"""The GPU memory slice watch's parts: the rule (``SliceLimit``), the NVML reader against a
stand-in NVML module, and the bounded reader. The agent's use of them is in
test_nodeagent_operations.py (the built-in model server) and test_nodeagent_userimage.py."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent.gpu import FakeProcessMemory, NvmlProcessMemory, ProcessMemoryReader, SliceLimit
from services.nodeagent.gpu.memory import used_by

GIB, MIB = 1 << 30, 1 << 20
HAS_GPU = Path("/dev/nvidia0").exists()


@pytest.mark.parametrize(("slice_bytes", "user_image", "used", "over"), [
    (20 * GIB, True, 20 * GIB, False),  # exactly the slice, contexts included
    (20 * GIB, True, 20 * GIB + 1, True),  # a user image gets nothing beyond its slice
    (20 * GIB, False, 22 * GIB, False),  # the built-in model server: slice + its CUDA context allowance
    (20 * GIB, False, 22 * GIB + 1, True),
    (0, True, 80 * GIB, False),  # no slice: not watched
    (0, False, 80 * GIB, False),
])
def test_the_limit_is_the_slice_for_a_user_image_and_slice_plus_allowance_for_the_builtin(
        slice_bytes: int, user_image: bool, used: int, over: bool) -> None:
    assert SliceLimit.of(slice_bytes, user_image, 2 * GIB).over(used) is over


def test_the_reason_names_what_was_used_the_slice_and_the_gpu() -> None:
    assert SliceLimit.of(20 * GIB, True, 2 * GIB).reason(20 * GIB + 5 * MIB, 3) == (
        "over its GPU memory slice: used 20485 MiB of 20480 MiB on GPU 3")
    assert SliceLimit.of(20 * GIB, False, 2 * GIB).reason(23 * GIB, 0) == (
        "over its GPU memory slice: used 23552 MiB of 20480 MiB on GPU 0 "
        "(the built-in model server may use 2048 MiB more for its CUDA context)")


def test_only_the_given_pids_count_each_once() -> None:
    usage = {10: 3 * GIB, 11: 1 * GIB, 99: 70 * GIB}  # 99 is another container's
    assert used_by([10, 11, 10, 12], usage) == 4 * GIB  # 12 holds no GPU memory


class NVMLError(Exception):
    pass


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 - NVML's name


@dataclass
class StandInNvml:
    """The parts of pynvml the reader calls: per GPU, compute and graphics process lists."""

    compute: list[list[Proc]]
    graphics: list[list[Proc]]
    init_error: str = ""
    read_error: str = ""
    calls: list[str] = field(default_factory=list)
    NVMLError: type[Exception] = NVMLError

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names from here on
        self.calls.append("init")
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        if self.read_error:
            raise NVMLError(self.read_error)
        return len(self.compute)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Proc]:  # noqa: N802
        return self.compute[handle]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Proc]:  # noqa: N802
        return self.graphics[handle]


def test_nvml_usage_is_per_host_pid_summed_over_gpus_and_nvml_starts_once() -> None:
    nvml = StandInNvml(
        compute=[[Proc(619, 1713373184), Proc(700, None)], [Proc(619, 2 * GIB)]],  # None: the driver cannot tell
        graphics=[[Proc(619, 1713373184), Proc(800, 64 * MIB)], []])  # 619 in both lists of GPU 0 is one process
    reader = NvmlProcessMemory(nvml)
    assert reader() == {619: 1713373184 + 2 * GIB, 700: 0, 800: 64 * MIB}
    assert reader() == {619: 1713373184 + 2 * GIB, 700: 0, 800: 64 * MIB}
    reader.close()
    reader.close()
    assert nvml.calls == ["init", "shutdown"]


def test_without_nvml_the_watch_is_off_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = StandInNvml([], [], init_error="NVML Shared Library Not Found")
    reader = NvmlProcessMemory(nvml)
    with caplog.at_level(logging.INFO, "services.nodeagent.gpu.memory"):
        assert reader() is None and reader() is None
    assert nvml.calls == ["init"]  # not retried every pass
    assert [r.getMessage() for r in caplog.records] == [
        "GPU memory watch off: NVML unavailable (NVML Shared Library Not Found)"]
    reader.close()
    assert nvml.calls == ["init"]


def test_this_hosts_nvml_reads_only_with_a_gpu() -> None:
    reader = NvmlProcessMemory()  # the real pynvml: no driver on a CPU host, never an exception
    usage = reader()
    reader.close()
    assert (usage is not None) is HAS_GPU


def test_a_failed_read_judges_nothing_and_warns_once_while_it_lasts(caplog: pytest.LogCaptureFixture) -> None:
    nvml = StandInNvml([[Proc(5, GIB)]], [[]], read_error="GPU is lost")
    reader = NvmlProcessMemory(nvml)
    with caplog.at_level(logging.WARNING, "services.nodeagent.gpu.memory"):
        assert reader() is None and reader() is None
        nvml.read_error = ""
        assert reader() == {5: GIB}
    assert [r.getMessage() for r in caplog.records] == ["cannot read per-process GPU memory: GPU is lost"]


async def test_a_stuck_read_is_bounded_and_not_stacked() -> None:
    release, calls = threading.Event(), []

    def stuck() -> dict[int, int]:
        calls.append(1)
        release.wait(10)
        return {1: GIB}

    reader = ProcessMemoryReader(stuck, timeout_s=0.05)
    assert await reader.read() is None  # too slow: nothing judged this pass
    assert await reader.read() is None and len(calls) == 1  # the stuck read still runs: no second thread
    release.set()
    got = None
    for _ in range(100):  # once the stuck read is over, the next one reads again
        if (got := await reader.read()) is not None:
            break
        await asyncio.sleep(0.01)
    assert got == {1: GIB} and len(calls) == 2


async def test_a_broken_source_reads_none_and_a_fake_reads_what_it_is_given() -> None:
    def broken() -> Any:
        raise RuntimeError("bug in a source")

    assert await ProcessMemoryReader(broken).read() is None
    fake = FakeProcessMemory({7: GIB})
    assert await ProcessMemoryReader(fake).read() == {7: GIB} and fake.reads == 1
    fake.usage = None  # no NVML
    assert await ProcessMemoryReader(fake).read() is None
