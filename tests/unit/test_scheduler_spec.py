"""Spec validation and defaults: one row per bad field, and the defaults a bare spec gets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.scheduler.spec import DEFAULT_SAMPLE_REQUEST, normalize, split_function_id, validated_at_deploy
from snapwake.errors import InvalidArgument
from snapwake.v1.types_pb2 import FunctionSpec, Policy, Resources, SnapshotMode


def base() -> FunctionSpec:
    return FunctionSpec(name="llama", model_dir="/models/llama")


def custom() -> FunctionSpec:
    return FunctionSpec(name="svc", image="docker://ghcr.io/acme/svc:1", command=["serve"])


def with_(make: Callable[[], FunctionSpec], **changes: object) -> Callable[[], FunctionSpec]:
    def build() -> FunctionSpec:
        spec = make()
        for path, value in changes.items():
            target: object = spec
            *parents, leaf = path.split("__")
            for p in parents:
                target = getattr(target, p)
            if isinstance(value, list):
                getattr(target, leaf).extend(value)
            elif isinstance(value, dict):
                getattr(target, leaf).update(value)
            else:
                setattr(target, leaf, value)
        return spec
    return build


BAD = [
    ("spec.name", with_(base, name="")),
    ("spec.name", with_(base, name="Llama")),
    ("spec.name", with_(base, name="-x")),
    ("spec.name", with_(base, name="a" * 64)),
    ("spec.tenant", with_(base, tenant="a_b")),
    ("spec.namespace", with_(base, namespace="x/y")),
    ("spec.model_dir", with_(base, model_dir="")),
    ("spec.model_dir", with_(base, model_dir="relative/path")),
    ("spec.command", with_(base, command=["python"])),
    ("spec.command", with_(custom, command=["serve", ""])),
    ("spec.http_port", with_(base, http_port=70000)),
    ("spec.health_path", with_(base, health_path="health")),
    ("spec.sample_request", with_(base, sample_request="{not json")),
    ("spec.sample_request", with_(base, sample_request="[1, 2]")),
    ("spec.env", with_(base, env={"1BAD": "x"})),
    ("spec.env", with_(base, env={"LD_PRELOAD": "/models/llama/x.so"})),
    ("spec.env", with_(base, env={"PYTHONPATH": "/models/llama"})),
    ("spec.env", with_(custom, env={"NODE_OPTIONS": "--require /x.js"})),
    ("spec.resources.gpu_count", with_(base, resources__gpu_count=2, resources__gpu_memory_bytes=1)),
    ("spec.resources.gpu_memory_bytes", with_(base, resources__gpu_count=1)),
    ("spec.resources.cpu_millis", with_(base, resources__cpu_millis=2_000_000)),
    ("spec.policy.max_instances", with_(base, policy__max_instances=1001)),
    ("spec.policy.min_instances", with_(base, policy__max_instances=2, policy__min_instances=3)),
    ("spec.policy.concurrency", with_(base, policy__concurrency=5000)),
    ("spec.policy.queue_len", with_(base, policy__queue_len=1_000_000)),
    ("spec.policy.standby_per_node", with_(base, policy__standby_per_node=65)),
    ("spec.policy.standby_per_node",
     with_(custom, policy__snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE, policy__standby_per_node=1)),
    ("spec.policy.snapshot_mode", with_(custom, policy__snapshot_mode=SnapshotMode.SNAPSHOT_MODE_ARENA)),
    ("spec.policy.snapshot_mode", with_(base, policy__snapshot_mode=99)),
    ("spec.policy.queue_timeout", with_(base, policy__queue_timeout__seconds=-1)),
    ("spec.policy.idle_timeout", with_(base, policy__idle_timeout__seconds=10 ** 6)),
    ("spec.policy.start_timeout", with_(base, policy__start_timeout__seconds=-5)),
    # user images
    ("spec.image", with_(custom, image="docker://ghcr.io/acme/Svc:1")),
    ("spec.image", with_(custom, image="docker://ghcr.io/acme/svc:-bad")),
    ("spec.image", with_(custom, image="docker://ghcr.io/acme/svc@sha256:abc")),
    ("spec.image", with_(custom, image="oci-archive:relative/img.tar")),
    ("spec.image", with_(custom, image="docker://registry:99999/svc:1")),
    ("spec.image", with_(custom, image="docker://ghcr.io/acme/svc :1")),
    ("spec.http_port", with_(custom, http_port=65536)),
    ("spec.health_path", with_(custom, health_path="v1/models")),
    ("spec.health_path", with_(custom, health_path="/he alth")),
    ("spec.sample_request", with_(custom, sample_request="{oops")),
    ("spec.sample_request", with_(custom, sample_request='{"model": 7}')),
    ("spec.served_model_name", with_(custom, served_model_name="has space")),
    ("spec.served_model_name", with_(custom, served_model_name="-leading-dash")),
    ("spec.served_model_name", with_(custom, served_model_name="/models/../etc")),
    ("spec.served_model_name", with_(custom, served_model_name="//models")),
    ("spec.served_model_name", with_(custom, served_model_name="x" * 300)),
    ("spec.served_model_name", with_(base, served_model_name="m")),  # builtin: not its business
    ("spec.registry_secret", with_(custom, registry_secret="user:password")),
    ("spec.registry_secret", with_(custom, registry_secret="Bearer abc")),
    ("spec.registry_secret", with_(base, registry_secret="ghcr")),
    ("spec.args", with_(base, args=["--x"])),
    ("spec.args", with_(custom, args=["a\0b"])),
    ("spec.env", with_(custom, env={"LD_PRELOAD": "/x.so"})),
    ("spec.env", with_(custom, env={"PYTHONPATH": "/x"})),
    ("spec.env", with_(base, env={"SNAPWAKE_CONTROL_SOCKET": "/x"})),
    ("spec.env", with_(custom, env={"CUDA_VISIBLE_DEVICES": "1"})),
    ("spec.model_dir", with_(custom, model_dir="models/rel")),
]


@pytest.mark.parametrize(("field", "make"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_is_named(field: str, make: Callable[[], FunctionSpec]) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize(make())
    assert info.value.field == field
    assert field in info.value.message


def test_defaults_for_builtin() -> None:
    spec = normalize(base())
    assert (spec.tenant, spec.namespace, spec.image) == ("default", "default", "builtin")
    assert (spec.http_port, spec.health_path, spec.sample_request) == (8000, "/health", DEFAULT_SAMPLE_REQUEST)
    p = spec.policy
    assert (p.min_instances, p.max_instances, p.standby_per_node, p.concurrency, p.queue_len) == (0, 4, 1, 4, 64)
    assert (p.queue_timeout.seconds, p.idle_timeout.seconds, p.start_timeout.seconds) == (30, 300, 120)
    assert p.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_ARENA


def test_defaults_for_custom_image() -> None:
    # A user image is checkpointed whole (process mode) with one standby per node, warmed up by
    # the same one-token chat as the builtin; its readiness path is left to the node (/health,
    # then /v1/models), its digest to the deploy validation.
    spec = normalize(custom())
    assert spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_PROCESS
    assert spec.policy.standby_per_node == 1
    assert spec.sample_request == DEFAULT_SAMPLE_REQUEST
    assert (spec.http_port, spec.health_path, spec.model_dir) == (8000, "", "")
    assert validated_at_deploy(spec)


@pytest.mark.parametrize("name", ["/snapwake/model", "/models/llama-3.1-8b", "Qwen/Qwen2.5-0.5B-Instruct", "m:v1"])
def test_a_served_name_may_be_a_model_id_or_the_path_a_server_names_its_model_by(name: str) -> None:
    assert normalize(with_(custom, served_model_name=name)()).served_model_name == name


def test_a_user_image_spec_keeps_what_it_was_given() -> None:
    given = with_(custom, image="oci-archive:/srv/images/llm.tar", args=["--port", "9000", ""], http_port=9000,
                  health_path="/v1/models", served_model_name="Qwen/Qwen2.5-0.5B-Instruct",
                  registry_secret="ghcr-acme", sample_request='{"prompt": "hi", "max_tokens": 1}',
                  model_dir="/models/q", env={"HF_HOME": "/tmp/hf"},
                  policy__snapshot_mode=SnapshotMode.SNAPSHOT_MODE_NONE)()
    spec = normalize(given)
    assert list(spec.args) == ["--port", "9000", ""]  # an empty argument is a real one
    assert (spec.http_port, spec.health_path, spec.served_model_name, spec.registry_secret) == (
        9000, "/v1/models", "Qwen/Qwen2.5-0.5B-Instruct", "ghcr-acme")
    assert spec.sample_request == '{"prompt": "hi", "max_tokens": 1}' and spec.model_dir == "/models/q"
    assert spec.policy.snapshot_mode == SnapshotMode.SNAPSHOT_MODE_NONE and spec.policy.standby_per_node == 0
    assert validated_at_deploy(spec)  # even without a snapshot: a user image is validated at deploy


@pytest.mark.parametrize(("mode", "pending"), [
    (SnapshotMode.SNAPSHOT_MODE_ARENA, True), (SnapshotMode.SNAPSHOT_MODE_PROCESS, False),
    (SnapshotMode.SNAPSHOT_MODE_NONE, False),
])
def test_a_builtin_revision_waits_only_for_an_arena_snapshot(mode: int, pending: bool) -> None:
    assert validated_at_deploy(normalize(with_(base, policy__snapshot_mode=mode)())) is pending


def test_explicit_values_are_kept_and_input_untouched() -> None:
    given = FunctionSpec(name="x", model_dir="/m", resources=Resources(gpu_count=1, gpu_memory_bytes=1 << 30),
                         policy=Policy(max_instances=2, concurrency=1, standby_per_node=0))
    spec = normalize(given)
    assert (spec.policy.max_instances, spec.policy.concurrency, spec.policy.standby_per_node) == (2, 1, 0)
    assert given.tenant == "" and not given.policy.HasField("queue_timeout")


@pytest.mark.parametrize(("fid", "ok"), [
    ("a/b/c", True), ("t1/default/llama-3", True), ("a/b", False), ("a/b/c/d", False),
    ("A/b/c", False), ("a//c", False), ("a/b/c-", False),
])
def test_function_ids(fid: str, ok: bool) -> None:
    if ok:
        assert split_function_id(fid) == tuple(fid.split("/"))
    else:
        with pytest.raises(InvalidArgument, match="function_id"):
            split_function_id(fid)
