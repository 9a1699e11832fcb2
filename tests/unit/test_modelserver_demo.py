"""The demo model is deterministic, idempotent and loadable by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelserver.config import ModelServerConfig
from modelserver.demo import make_demo_model
from snapwake.config import ConfigError, load


def _bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes_and_idempotent(tmp_path: Path, demo_model_dir: Path) -> None:
    again = make_demo_model(tmp_path / "again", seed=0)
    assert _bytes(again) == _bytes(demo_model_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    assert make_demo_model(again, seed=0) == again
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes  # nothing rewritten
    other = make_demo_model(tmp_path / "other", seed=1)
    assert _bytes(other)["model.safetensors"] != _bytes(again)["model.safetensors"]
    assert sum(len(b) for b in _bytes(again).values()) < 5 << 20


def test_tokenizer_and_chat_template(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|assistant|>\n") and "Hi there" in text
    ids = tok("Hello, world! ünïcode", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Hello, world! ünïcode"


@pytest.mark.parametrize(("argv", "needle"), [
    ([], "--model-dir"),
    (["--model-dir", "m", "--device", "tpu"], "--device"),
    (["--model-dir", "m", "--start-mode", "warm"], "--start-mode"),
    (["--model-dir", "m", "--start-mode", "standby"], "--snapshot-id"),
    (["--model-dir", "m", "--sample-request", "{bad"], "--sample-request"),
    (["--model-dir", "m", "--port", "x"], "--port"),
    (["--model-dir", "m", "--max-batch", "0"], "--max-batch: expected 1..1024, got 0"),
    (["--model-dir", "m", "--cuda-graphs", "maybe"], "--cuda-graphs: expected a boolean"),
])
def test_bad_config_names_the_key(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(ModelServerConfig, argv, env={})


def test_the_runtime_cli_refuses_bad_flags_in_one_line_with_exit_2() -> None:
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-m", "modelserver", "--model-dir", "m", "--max-batch", "0"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2
    assert got.stderr.strip().splitlines() == ["invalid configuration: --max-batch: expected 1..1024, got 0"]


def test_the_runtime_cli_refuses_a_bad_tracing_setting_in_one_line_with_exit_2() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"}
    got = subprocess.run([sys.executable, "-m", "modelserver", "--model-dir", "m"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert got.returncode == 2
    assert got.stderr.strip().splitlines() == [
        "OTEL_TRACES_EXPORTER: unsupported exporter 'zipkin' (expected otlp, console or none)"]


def test_a_failed_start_exits_at_once_with_status_1_and_the_reason(tmp_path: Path) -> None:
    """A model dir without a tokenizer: the process must exit (not wait on its threads), so the
    nodeagent sees a failed start rather than a start that times out."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text("{}")
    got = subprocess.run([sys.executable, "-m", "modelserver", "--model-dir", str(tmp_path), "--device", "cpu",
                          "--port", "0"], capture_output=True, text=True, timeout=90)
    assert got.returncode == 1, got.stderr[-2000:]
    assert "model server failed" in got.stderr
