"""GPU inventory and the driver checkpoint. The CUDA test runs only on a GPU machine (-m gpu)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.nodeagent.gpu import CudaCheckpointer, NoGpuCheckpointer, discover, host_memory_bytes

HAS_GPU = Path("/dev/nvidia0").exists()


@pytest.mark.skipif(HAS_GPU, reason="this host has a GPU")
def test_no_gpu_means_empty_inventory() -> None:
    assert discover() == []


def test_host_memory_is_the_physical_memory() -> None:
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    assert abs(host_memory_bytes() - int(meminfo[1]) * 1024) < (64 << 20)


async def test_no_gpu_checkpointer_has_nothing_to_do() -> None:
    checkpointer = NoGpuCheckpointer()
    assert await checkpointer.checkpoint(1) == 0.0
    assert await checkpointer.restore(1) == 0.0


# A child that holds device memory with a known pattern and checks it on request.
_CHILD = textwrap.dedent("""
    import sys
    from cuda.bindings import driver as cu
    def ok(r):
        assert int(r[0]) == 0, r
        return r[1] if len(r) > 1 else None
    ok(cu.cuInit(0)); dev = ok(cu.cuDeviceGet(0)); ctx = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ok(cu.cuCtxSetCurrent(ctx))
    n = 64 << 20
    ptr = ok(cu.cuMemAlloc(n)); ok(cu.cuMemsetD8(ptr, 0x5A, n)); ok(cu.cuCtxSynchronize())
    print("READY", flush=True)
    for line in sys.stdin:
        buf = bytearray(4096); ok(cu.cuMemcpyDtoH(buf, ptr, 4096))
        print("CHECK", int(all(b == 0x5A for b in buf)), flush=True)
""")


def _used_mib(index: int = 0) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                          "-i", str(index)], capture_output=True, text=True, timeout=30).stdout
    return sum(int(line.split(",")[1]) for line in out.splitlines() if line.strip())


@pytest.mark.gpu
def test_cuda_checkpoint_frees_the_gpu_and_restore_brings_memory_back() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().startswith("READY")
        before = _used_mib()
        checkpointer = CudaCheckpointer()
        assert asyncio.run(checkpointer.checkpoint(child.pid)) > 0
        time.sleep(0.5)
        assert _used_mib() < before  # the device memory moved to the child's host memory
        assert asyncio.run(checkpointer.restore(child.pid)) > 0
        child.stdin.write("check\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["CHECK", "1"]
    finally:
        child.kill()
        child.wait(30)
