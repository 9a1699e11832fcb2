"""The model metadata of a built-in function, read from its model directory at start.

The node is the one part that sees the model directory (the scheduler may run elsewhere), so
it reads what the gateway needs to refuse a request that cannot fit (``types.ModelMetadata``)
and reports it on the instance; the scheduler copies it onto the function. Only small JSON
files are read, no weights and no tokenizer. A directory it cannot read gives no metadata: the
start itself then says what is wrong.

A config.json that names an architecture or a quantisation the built-in model server does not
run is refused here, at deploy, with an error naming it (``snapwake.modelsupport``), before any
container starts. An embedding model is recorded as one (``embedding_size``), so the gateway
sends it /v1/embeddings only, and a chat model never.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from snapwake.modelsupport import check_model_config, read_embedding
from snapwake.v1 import types_pb2

__all__ = ["read_model_metadata"]

log = logging.getLogger(__name__)
# Where Hugging Face tokenizers keep a chat template besides tokenizer_config.json.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _count(config: dict[str, Any], key: str) -> int:
    """A positive integer of the model config (or its ``text_config``), 0 when absent."""
    for where in (config, config.get("text_config") or {}):
        value = where.get(key) if isinstance(where, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 32:
            return value
    return 0


def read_model_metadata(model_dir: Path) -> types_pb2.ModelMetadata | None:
    """What ``model_dir``'s config.json and tokenizer files say; None if they cannot be read.
    InvalidArgument naming the architecture or quantisation when the model server cannot run it."""
    try:
        config = _json(model_dir / "config.json")
        tokenizer = _json(model_dir / "tokenizer_config.json")
    except (OSError, ValueError) as exc:
        log.warning("no model metadata from %s: %s", model_dir, exc)
        return None
    if not config:
        return None
    if "model_type" in config:  # without one, the model server's load says what is wrong
        check_model_config(config)
    template = bool(tokenizer.get("chat_template")) or any((model_dir / f).is_file() for f in _TEMPLATE_FILES)
    embedding = read_embedding(model_dir, config)
    return types_pb2.ModelMetadata(max_context_tokens=_count(config, "max_position_embeddings"),
                                   vocab_size=_count(config, "vocab_size"), has_chat_template=template,
                                   embedding_size=embedding.size if embedding else 0,
                                   matryoshka=bool(embedding and embedding.matryoshka))
