"""The benchmark models' tokenizer covers the whole model vocabulary."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from bench.models import full_vocab_tokenizer
from modelserver.demo import make_demo_model


def test_every_id_past_the_demo_vocab_decodes_to_text_and_encoding_is_unchanged(tmp_path: Path) -> None:
    demo = make_demo_model(tmp_path / "demo")
    original = Tokenizer.from_file(str(demo / "tokenizer.json"))
    grown = Tokenizer.from_str(full_vocab_tokenizer((demo / "tokenizer.json").read_text(), 32000))
    assert grown.get_vocab_size() == 32000
    assert grown.decode([600]) == " t600" and grown.decode([31999, 4000]) == " t31999 t4000"
    text = "The quick brown fox jumps over the lazy dog."
    assert grown.encode(text).ids == original.encode(text).ids
    assert grown.decode(original.encode(text).ids) == original.decode(original.encode(text).ids)
