"""The model metadata a node reads from a model directory at start (what the gateway checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent.modelinfo import read_model_metadata
from snapwake import errors
from snapwake.v1 import types_pb2


def _dir(tmp_path: Path, files: dict[str, Any]) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


@pytest.mark.parametrize(("files", "want"), [
    ({"config.json": {"max_position_embeddings": 8192, "vocab_size": 128256},
      "tokenizer_config.json": {"chat_template": "{{ messages }}"}}, (8192, 128256, True)),
    ({"config.json": {"max_position_embeddings": 4096, "vocab_size": 32000}}, (4096, 32000, False)),
    ({"config.json": {"vocab_size": 32000}, "chat_template.jinja": "{{ messages }}"}, (0, 32000, True)),
    ({"config.json": {"text_config": {"max_position_embeddings": 2048, "vocab_size": 100}}}, (2048, 100, False)),
    ({"config.json": {"max_position_embeddings": "big", "vocab_size": True}}, (0, 0, False)),
    ({"config.json": {"max_position_embeddings": 1 << 40, "vocab_size": 5}}, (0, 5, False)),
])
def test_reads_the_context_vocabulary_and_chat_template(tmp_path: Path, files: dict[str, Any],
                                                        want: tuple[int, int, bool]) -> None:
    meta = read_model_metadata(_dir(tmp_path, files))
    assert meta is not None
    assert (meta.max_context_tokens, meta.vocab_size, meta.has_chat_template) == want


@pytest.mark.parametrize("files", [{}, {"config.json": "{not json"}, {"config.json": "[1]"},
                                   {"config.json": {"vocab_size": 5}, "tokenizer_config.json": "{"}])
def test_an_unreadable_directory_gives_none(tmp_path: Path, files: dict[str, Any]) -> None:
    assert read_model_metadata(_dir(tmp_path, files)) is None


def test_the_demo_model(demo_model_dir: Path) -> None:
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert read_model_metadata(demo_model_dir) == types_pb2.ModelMetadata(
        max_context_tokens=config["max_position_embeddings"], vocab_size=config["vocab_size"],
        has_chat_template=True)


_POOLING = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def test_an_embedding_model_is_recorded_as_one(tmp_path: Path) -> None:
    _dir(tmp_path, {"config.json": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                                    "vocab_size": 151669, "max_position_embeddings": 32768, "is_matryoshka": True},
                    "modules.json": _POOLING})
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    meta = read_model_metadata(tmp_path)
    assert meta is not None and (meta.embedding_size, meta.matryoshka) == (1024, True)
    # A mean-pooled model is refused at deploy, naming its pooling, not served wrongly.
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    with pytest.raises(errors.InvalidArgument, match="pooling mean_tokens"):
        read_model_metadata(tmp_path)


def test_a_chat_model_is_not_an_embedding_model(demo_model_dir: Path) -> None:
    meta = read_model_metadata(demo_model_dir)
    assert meta is not None and meta.embedding_size == 0
