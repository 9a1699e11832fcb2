"""The CUDA arena on a real GPU (run on the GPU machine: ``pytest -m gpu``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_cuda():  # noqa: ANN201
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def test_export_attach_release_keeps_the_address(torch_cuda) -> None:  # noqa: ANN001
    from modelserver.arena.cuda import CudaArena

    torch = torch_cuda
    owner, user = CudaArena(0), CudaArena(0, reserve_bytes=64 << 20)
    owner.allocate(3 << 20)
    data = torch.arange(owner.size, device="cuda:0", dtype=torch.int64).to(torch.uint8)
    owner.tensor().copy_(data)
    user.attach(owner.export_fd(), owner.size)
    address = user.tensor().data_ptr()
    owner.release()  # the importer's handle keeps the memory alive
    assert torch.equal(user.tensor(), data)
    user.release()
    assert user.size == 0
    owner.allocate(3 << 20)
    owner.tensor().copy_(data)
    user.attach(owner.export_fd(), owner.size)
    assert user.tensor().data_ptr() == address  # same reserved range, same pointers
    assert torch.equal(user.tensor(), data)
    user.release()
    owner.release()


def test_model_on_cuda_arena_matches_cpu(torch_cuda, demo_model_dir: Path) -> None:  # noqa: ANN001
    from modelserver.__main__ import load_tokenizer
    from modelserver.arena import MemfdArena
    from modelserver.arena.cuda import CudaArena
    from modelserver.instance import Instance, Settings
    from modelserver.sampling import SamplingParams

    torch = torch_cuda
    tok = load_tokenizer(demo_model_dir)
    gpu = Instance(Settings(demo_model_dir), CudaArena(0), tok)
    cpu = Instance(Settings(demo_model_dir), MemfdArena(), tok)
    gpu.load_from_dir()
    cpu.load_from_dir()
    ids = torch.tensor([[1, 5, 40, 77, 300]])
    with torch.inference_mode():
        got = gpu.skeleton.model(ids.cuda()).logits.cpu()
        want = cpu.skeleton.model(ids).logits
    assert torch.allclose(got, want, atol=1e-3)
    out: list[str] = []
    gpu.run([1, 5, 40], SamplingParams(max_tokens=8, temperature=0), threading.Event(), lambda p: out.append(p.text))
    assert out
    gpu.release()
    cpu.release()
    assert torch.cuda.memory_allocated(0) < (1 << 20)  # weights and KV are gone


def test_release_trims_the_stack_and_attach_sets_it_back(torch_cuda) -> None:  # noqa: ANN001
    from modelserver.arena.cuda import FALLBACK_STACK_BYTES, CudaArena
    from snapwake.cuda import check, driver

    torch = torch_cuda
    cu = driver()
    stack = cu.CUlimit.CU_LIMIT_STACK_SIZE
    owner, user, untrimmed = CudaArena(0, trim=False), CudaArena(0), CudaArena(0, trim=False)
    owner.allocate(3 << 20)
    # The driver's default; an earlier test's trimmed release may have left it lower.
    check(cu.cuCtxSetLimit(stack, 1024), "cuCtxSetLimit")
    data = torch.arange(owner.size, device="cuda:0", dtype=torch.int64).to(torch.uint8)
    owner.tensor().copy_(data)
    user.attach(owner.export_fd(), owner.size)
    before = int(check(cu.cuCtxGetLimit(stack), "cuCtxGetLimit"))
    assert before >= 1024
    torch.cuda.empty_cache()  # what release frees besides the stack, freed before the measure
    free = torch.cuda.mem_get_info(0)[0]
    user.release()
    assert int(check(cu.cuCtxGetLimit(stack), "cuCtxGetLimit")) <= FALLBACK_STACK_BYTES
    assert torch.cuda.mem_get_info(0)[0] > free  # the context's local memory shrank
    user.attach(owner.export_fd(), owner.size)
    assert int(check(cu.cuCtxGetLimit(stack), "cuCtxGetLimit")) == before
    assert torch.equal(user.tensor(), data)
    untrimmed.attach(owner.export_fd(), owner.size)
    untrimmed.release()  # trim off: today's release leaves the stack as it is
    assert int(check(cu.cuCtxGetLimit(stack), "cuCtxGetLimit")) == before
    user.release()
    owner.release()
