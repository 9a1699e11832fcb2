"""The model metadata a node reads from a model directory at start (what the gateway checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent.modelinfo import read_model_metadata
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
