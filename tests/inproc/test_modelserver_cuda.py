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
