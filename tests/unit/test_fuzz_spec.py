"""Hypothesis against the spec validators (issue 12, Proof): the scheduler's ``normalize`` and
the node's own ``spec_checks``.

Any spec a tenant can send is either refused with ``InvalidArgument`` naming a ``spec.`` field,
or accepted; an accepted spec is a fixed point (normalizing it again changes nothing) and
survives the wire (serialized and parsed back, it is the same spec and still valid). Strings
come from the whole of Unicode and NUL; numbers from the whole range of their proto types.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzzing import fuzz_settings
from google.protobuf.duration_pb2 import Duration
from hypothesis import example, given
from hypothesis import strategies as st

from services.nodeagent.spec_checks import check_env, resolve_model_dir
from services.scheduler.spec import normalize
from snapwake.errors import InvalidArgument
from snapwake.v1.types_pb2 import FunctionSpec, Policy, Resources, SnapshotMode

U32, U64, I64 = (0, 2**32 - 1), (0, 2**64 - 1), (-(2**63), 2**63 - 1)


def _text(*likely: str) -> st.SearchStrategy[str]:
    """Mostly plausible values (so cases get past the first check), sometimes anything."""
    return st.one_of(st.sampled_from(likely), st.text(max_size=40))


def _int(bounds: tuple[int, int], *likely: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(likely), st.integers(*bounds))


_DURATION = st.builds(Duration, seconds=_int(I64, 0, 1, 30, 86400, 86401, -1),
                      nanos=_int((-999_999_999, 999_999_999), 0, 1, 500_000_000, -1))
_POLICY = st.builds(
    Policy, min_instances=_int(U32, 0, 1, 5), max_instances=_int(U32, 0, 1, 4, 1001),
    standby_per_node=_int(U32, 0, 1, 65), concurrency=_int(U32, 0, 1, 1025), queue_len=_int(U32, 0, 1, 100_001),
    queue_timeout=_DURATION, idle_timeout=_DURATION, start_timeout=_DURATION,
    snapshot_mode=st.one_of(st.sampled_from(list(SnapshotMode.values())), st.integers(0, 2**31 - 1)))
_RESOURCES = st.builds(Resources, gpu_count=_int(U32, 0, 1, 2), gpu_memory_bytes=_int(U64, 0, 1 << 30),
                       cpu_millis=_int(U32, 0, 1000, 1_024_001), host_memory_bytes=_int(U64, 0, 1 << 30))
_ENV_KEY = _text("HF_HOME", "LD_PRELOAD", "PYTHONPATH", "SNAPWAKE_X", "1BAD", "A B", "")
_SPEC = st.builds(
    FunctionSpec,
    tenant=_text("", "acme", "Acme", "-a"), namespace=_text("", "default", "a" * 64), name=_text("llama", "", "a_b"),
    image=_text("", "builtin", "docker://ghcr.io/acme/svc:1", "oci:/images/svc", "docker://x", "oci:rel"),
    model_dir=_text("/models/llama", "", "relative", "/models/a\0b", "/../etc"),
    command=st.lists(_text("serve", "", "a\0b"), max_size=3), args=st.lists(_text("--x", "\0"), max_size=3),
    http_port=_int(U32, 0, 8000, 65536), health_path=_text("", "/health", "health", "/a b"),
    sample_request=_text("", '{"max_tokens": 1}', "[]", "{", '{"model": 1}', "[" * 5000),
    resources=_RESOURCES, policy=st.one_of(st.none(), _POLICY),
    env=st.dictionaries(_ENV_KEY, _text("1", "", "a\0b"), max_size=3),
    served_model_name=_text("", "acme/Echo-1B", "/models/x", "a//b", "/x/../y"),
    registry_secret=_text("", "ghcr-acme", "Bad Secret"))


def _check(spec: FunctionSpec) -> FunctionSpec | None:
    """The normalized spec, or None when refused (with a clear error)."""
    try:
        return normalize(spec)
    except InvalidArgument as exc:
        assert exc.field and exc.field.startswith("spec."), exc
        assert exc.message.startswith(exc.field.split(".")[0]), exc
        return None


@fuzz_settings(300)
@given(spec=_SPEC)
@example(spec=FunctionSpec(name="llama", model_dir="/models/llama", sample_request="[" * 100_000))  # a crash, fixed
@example(spec=FunctionSpec(name="llama", model_dir="/models/a\0b"))  # accepted, then a crash on the node; fixed
@example(spec=FunctionSpec(name="llama", model_dir="/models/llama", env={"HF_HOME": "/a\0b"}))  # accepted; fixed
def test_a_spec_is_refused_by_name_or_normalized_for_good(spec: FunctionSpec) -> None:
    normal = _check(spec)
    if normal is None:
        return
    assert normalize(normal) == normal  # a fixed point: the defaults are all filled in
    wire = FunctionSpec.FromString(normal.SerializeToString())
    assert wire == normal and normalize(wire) == normal
    assert "\0" not in normal.model_dir + normal.image + normal.health_path + "".join(normal.env.values())


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model root with one readable model dir, and the node's own state dir beside it."""
    base = tmp_path_factory.mktemp("roots")
    (base / "models" / "llama").mkdir(parents=True)
    (base / "models" / "llama" / "config.json").write_text("{}")
    os.chmod(base, 0o755)
    (base / "state").mkdir()
    return base / "models", base / "state"


_MODEL_DIR = st.one_of(st.sampled_from(["{models}/llama", "{models}", "{models}/../state", "{state}", "/",
                                        "{models}/llama\0x", "{models}/nope", "{models}/llama/config.json"]),
                       st.text(max_size=60), st.text(max_size=20).map(lambda t: "{models}/" + t))


@fuzz_settings(300)
@given(model_dir=_MODEL_DIR)
@example(model_dir="{models}/llama\0x")  # was a ValueError from os.path.realpath, now refused by name
def test_the_node_resolves_a_model_dir_or_refuses_it(roots: tuple[Path, Path], model_dir: str) -> None:
    models, state = roots
    path = model_dir.replace("{models}", str(models)).replace("{state}", str(state))
    try:
        real = resolve_model_dir(path, [str(models)], [str(state)])
    except InvalidArgument as exc:
        assert exc.field == "spec.model_dir" and exc.message.startswith("spec.model_dir: ")
        return
    assert real == os.path.realpath(path) and os.path.isdir(real)
    assert real == str(models) or real.startswith(str(models) + "/")  # the root itself is a model dir too


@fuzz_settings(100)
@given(env=st.dictionaries(_ENV_KEY, st.text(max_size=10), max_size=4))
def test_the_node_refuses_env_keys_by_name(env: dict[str, str]) -> None:
    try:
        check_env(env)
    except InvalidArgument as exc:
        assert exc.field == "spec.env" and any(f"spec.env: {k} " in exc.message for k in env)
