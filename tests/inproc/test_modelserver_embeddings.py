"""An embedding model on the model server, on the CPU: a small seeded random Qwen3 model saved as
Qwen3-Embedding is (the bare decoder, sentence-transformers' last-token Pooling and Normalize
modules), loaded through the model server's own path (skeleton, arena, checkpoint fill, bind) and
asked over real HTTP with the real openai client; every vector must be what transformers' own
``AutoModel`` gives for that input alone (its last token's final hidden state, L2-normalised)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from embedding_model import make_embedding_model

from modelserver.__main__ import DEFAULT_SAMPLE, load_tokenizer, warm_up
from modelserver.arena import MemfdArena
from modelserver.embedding import shorten
from modelserver.instance import Instance, Settings
from modelserver.openai import create_app
from snapwake.modelsupport import Embedding
from snapwake.testing import free_port, wait_for

MODEL = "emb"
TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog. One two three four five.", "A"]
IDS = [[5, 9, 33, 7], [11] * 23, [300]]


def reference(path: Path, inputs: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        rows = [model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in inputs]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_embedding_model(tmp_path_factory.mktemp("models") / "emb")


@pytest.fixture(scope="module")
def instance(model_dir: Path) -> Iterator[Instance]:
    inst = Instance(Settings(model_dir), MemfdArena(), load_tokenizer(model_dir))
    inst.load_from_dir()
    yield inst
    inst.release()


@pytest.fixture(scope="module")
def base_url(instance: Instance) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(instance, MODEL), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "model server HTTP server")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_loads_as_an_embedding_model(instance: Instance) -> None:
    assert instance.engine is None and instance.embedder is not None
    for sample in (DEFAULT_SAMPLE, {"input": "Hello there"}):  # the snapshot and standby starts' warm-up
        warm_up(instance, sample)
    assert not any(name.startswith("lm_head") for name, _, _ in instance.skeleton.entries)  # type: ignore[union-attr]
    # The manifest says so too: an instance attached from the snapshot rebuilds the same skeleton.
    assert Embedding.from_json(instance.modelserver_config["embedding"]) == Embedding(64, True, False)


def test_string_batch_matches_transformers(model_dir: Path, instance: Instance, client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    ids = [list(instance.tokenizer(t)["input_ids"]) for t in TEXTS]
    want = reference(model_dir, ids)
    got = torch.tensor([d.embedding for d in out.data])
    assert [d.index for d in out.data] == [0, 1, 2] and got.shape == (3, 64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    # Distinct inputs, distinct vectors: the comparison above is not between constants.
    assert torch.cdist(got, got).fill_diagonal_(1).min() > 1e-3


def test_token_ids_as_floats_and_base64(model_dir: Path, base_url: str) -> None:
    want = reference(model_dir, IDS)
    bodies = {fmt: httpx.post(base_url + "/v1/embeddings", timeout=30, json={
        "model": MODEL, "input": IDS, "encoding_format": fmt}).json() for fmt in ("float", "base64")}
    floats = torch.tensor([d["embedding"] for d in bodies["float"]["data"]])
    torch.testing.assert_close(floats, want, atol=1e-4, rtol=1e-4)
    raw = [torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32)
           for d in bodies["base64"]["data"]]
    assert torch.equal(torch.stack(raw), floats)
    assert bodies["float"]["usage"]["prompt_tokens"] == sum(map(len, IDS))
    one = httpx.post(base_url + "/v1/embeddings", timeout=30, json={"model": MODEL, "input": IDS[0]}).json()
    torch.testing.assert_close(torch.tensor(one["data"][0]["embedding"]), want[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "dimensions": 32}, "dimensions"),  # not trained for shorter vectors
    ({"input": "x", "dimensions": 65}, "dimensions"),
    ({"input": [[1, 512]]}, "input"),  # past the vocabulary
    ({"input": [[1] * 129]}, "input"),  # past the context
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "pooling": "mean"}, "pooling"),
])
def test_bad_requests_are_400_naming_the_field(base_url: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(base_url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_embedding_model_refuses_generation(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    body: Any = err.value.body
    assert body["param"] == "model" and "embedding model" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi")
    body = err.value.body
    assert body["param"] == "model"


def test_small_batches_give_the_same_vectors(model_dir: Path, instance: Instance) -> None:
    """A request's inputs split over several padded batches (a token budget of 30) embed alike."""
    assert instance.embedder is not None
    inputs = [*IDS, [7] * 20, [8, 9]]
    whole = instance.embedder.embed(inputs)
    budget = instance.embedder.token_budget
    instance.embedder.token_budget = 30
    try:
        split = instance.embedder.embed(inputs)
    finally:
        instance.embedder.token_budget = budget
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, reference(model_dir, inputs), atol=1e-4, rtol=1e-4)


def test_matryoshka_vectors_are_cut_and_normalised_again() -> None:
    vectors = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    short = shorten(vectors, 16, normalize=True)
    assert short.shape == (3, 16)
    torch.testing.assert_close(short.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(short * vectors[:, :16].norm(dim=-1, keepdim=True), vectors[:, :16])
    assert shorten(vectors, None, True) is vectors and shorten(vectors, 64, True) is vectors
