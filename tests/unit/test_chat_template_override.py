"""The spec's ``chat_template``: checked at deploy (builtin only, bounded, valid Jinja), passed to
the model server as ``--chat-template``, and applied to the tokenizer in place of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelserver.__main__ import load_tokenizer
from services.nodeagent.bundle import modelserver_args
from services.scheduler.spec import normalize
from snapwake.errors import InvalidArgument
from snapwake.v1.types_pb2 import FunctionSpec

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_a_valid_override_is_kept() -> None:
    spec = normalize(FunctionSpec(name="m", model_dir="/models/m", chat_template=TEMPLATE))
    assert spec.chat_template == TEMPLATE


@pytest.mark.parametrize(("spec", "why"), [
    (FunctionSpec(name="m", model_dir="/models/m", chat_template="{% for m in messages %}"), "not a valid Jinja"),
    (FunctionSpec(name="m", model_dir="/models/m", chat_template="x" * (64 << 10 | 1)), "at most"),
    (FunctionSpec(name="m", image="docker://ghcr.io/acme/svc:1", chat_template=TEMPLATE), "builtin image"),
])
def test_a_bad_override_is_refused_naming_the_field(spec: FunctionSpec, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as info:
        normalize(spec)
    assert info.value.field == "spec.chat_template"


def test_the_node_passes_it_to_the_model_server() -> None:
    common = dict(model_dir="/m", port=1, device="cpu", gpu_index=0, gpu_memory_bytes=0, start_mode="load",
                  control_socket="/c", handover_socket="/h")
    args = modelserver_args("python3", **common, chat_template=TEMPLATE)  # type: ignore[arg-type]
    assert args[args.index("--chat-template") + 1] == TEMPLATE
    assert "--chat-template" not in modelserver_args("python3", **common)  # type: ignore[arg-type]


def test_the_model_server_renders_with_the_override(demo_model_dir: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    own = load_tokenizer(demo_model_dir).apply_chat_template(messages, tokenize=False)
    assert "<|user|>" in own
    got = load_tokenizer(demo_model_dir, TEMPLATE).apply_chat_template(messages, tokenize=False)
    assert got == "[user] hi\n"
