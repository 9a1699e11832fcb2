"""Image references and refused environment keys: the pure checks shared by the scheduler (at
deploy) and the nodeagent (before a pull)."""

from __future__ import annotations

import pytest

from snapwake.envcheck import refused_env_keys
from snapwake.errors import InvalidArgument
from snapwake.imageref import ImageRef, is_builtin, parse

D = "sha256:" + "ab" * 32

GOOD = [
    ("ubuntu", ImageRef("docker", "docker.io/library/ubuntu", "latest")),
    ("docker://ubuntu:22.04", ImageRef("docker", "docker.io/library/ubuntu", "22.04")),
    ("vllm/vllm-openai:v0.6.3", ImageRef("docker", "docker.io/vllm/vllm-openai", "v0.6.3")),
    ("ghcr.io/acme/llm-server:1.2", ImageRef("docker", "ghcr.io/acme/llm-server", "1.2")),
    ("localhost:5000/echo", ImageRef("docker", "localhost:5000/echo", "latest")),
    ("localhost/echo:dev_1", ImageRef("docker", "localhost/echo", "dev_1")),
    ("[::1]:5000/a/b__c", ImageRef("docker", "[::1]:5000/a/b__c", "latest")),
    (f"registry.local/team/m@{D}", ImageRef("docker", "registry.local/team/m", "", D)),
    (f"registry.local/team/m:v1@{D}", ImageRef("docker", "registry.local/team/m", "v1", D)),
    ("oci-archive:/srv/img.tar", ImageRef("oci-archive", "/srv/img.tar")),
    ("oci-archive:/srv/img.tar:server", ImageRef("oci-archive", "/srv/img.tar", "server")),
    ("oci:/var/lib/layouts/m:latest", ImageRef("oci", "/var/lib/layouts/m", "latest")),
]


@pytest.mark.parametrize(("text", "want"), GOOD, ids=[t for t, _ in GOOD])
def test_good_references(text: str, want: ImageRef) -> None:
    assert parse(text) == want
    assert parse(str(want)) == want  # str() is a reference again


BAD = [
    ("builtin", "built-in model server"),
    ("Ubuntu", "lowercase"),
    ("ghcr.io/acme/", "lowercase"),
    ("ghcr.io//x", "lowercase"),
    ("acme/llm:", "tag"),
    ("acme/llm:.x", "tag"),
    ("acme/llm:" + "x" * 129, "tag"),
    ("acme/llm@sha256:abc", "digest"),
    ("acme/llm@sha256:" + "AB" * 32, "digest"),
    ("acme/llm@md5", "digest"),
    ("host.example.com:70000/x", "port"),
    ("bad_host.example.com/x", "host"),
    ("-x.io/y", "host"),
    ("acme/llm latest", "whitespace"),
    (" acme/llm", "whitespace"),
    ("acme/llm\n", "whitespace"),
    ("oci-archive:img.tar", "absolute"),
    ("oci-archive:", "absolute"),
    ("oci:/srv/../etc/x", "'..'"),
    ("oci-archive:/srv/x.tar:a b", "whitespace"),
    ("ghcr.io/" + "a" * 250 + "/b", "longer than 255"),
]


@pytest.mark.parametrize(("text", "why"), BAD, ids=[t[:40] for t, _ in BAD])
def test_bad_references_name_the_field_and_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(text)
    assert info.value.field == "spec.image" and why in info.value.message and repr(text) in info.value.message


def test_sources_and_pinning() -> None:
    tagged = parse("ghcr.io/acme/llm:1")
    assert tagged.source == "docker://ghcr.io/acme/llm:1" and tagged.registry == "ghcr.io" and not tagged.local
    pinned = tagged.pinned(D)
    assert str(pinned) == f"ghcr.io/acme/llm:1@{D}" and parse(str(pinned)).digest == D
    archive = parse("oci-archive:/srv/img.tar")
    assert archive.local and archive.registry == "" and archive.source == "oci-archive:/srv/img.tar"
    assert archive.pinned(D) == archive  # a path cannot say a digest: the node compares instead


@pytest.mark.parametrize(("text", "builtin"), [("", True), ("builtin", True), ("builtin:1", False), ("x", False)])
def test_is_builtin(text: str, builtin: bool) -> None:
    assert is_builtin(text) is builtin


@pytest.mark.parametrize(("keys", "refused"), [
    ([], []),
    (["HF_HOME", "PATH", "OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL"], []),
    (["LD_PRELOAD", "LD_LIBRARY_PATH", "HF_HOME"], ["LD_LIBRARY_PATH", "LD_PRELOAD"]),
    (["PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"], ["PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"]),
    (["SNAPWAKE_CONTROL_SOCKET", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"],
     ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "SNAPWAKE_CONTROL_SOCKET"]),
    (["ld_preload", "LD_PRELOAD"], ["LD_PRELOAD", "ld_preload"]),  # either spelling
])
def test_refused_env_keys(keys: list[str], refused: list[str]) -> None:
    assert refused_env_keys(keys) == refused
