"""Image references (snapwake/imageref.py): what parses, to what, and the message
for everything else."""

from __future__ import annotations

import pytest

from services.nodeagent.images import BUILTIN, ImageRef, Transport, is_builtin, parse
from snapwake import errors

D = "sha256:" + "ab" * 32
DOCKER, ARCHIVE, OCI, DARCHIVE = Transport.DOCKER, Transport.OCI_ARCHIVE, Transport.OCI, Transport.DOCKER_ARCHIVE

GOOD = [
    ("docker://registry.example.com/team/model:v1", ImageRef(DOCKER, "registry.example.com/team/model", "v1")),
    ("docker://localhost:5000/echo:latest", ImageRef(DOCKER, "localhost:5000/echo", "latest")),
    ("docker://localhost/echo:1.0", ImageRef(DOCKER, "localhost/echo", "1.0")),
    ("docker://10.0.0.7:5000/a/b/c:x_Y-1.2", ImageRef(DOCKER, "10.0.0.7:5000/a/b/c", "x_Y-1.2")),
    ("docker://[::1]:5000/echo:v2", ImageRef(DOCKER, "[::1]:5000/echo", "v2")),
    ("docker://ghcr.io/org/vllm-openai@" + D, ImageRef(DOCKER, "ghcr.io/org/vllm-openai", "", D)),
    ("docker://docker.io/library/python:3.11-slim", ImageRef(DOCKER, "docker.io/library/python", "3.11-slim")),
    ("docker://reg.io/a__b/c.d/e-f:t", ImageRef(DOCKER, "reg.io/a__b/c.d/e-f", "t")),
    ("oci-archive:/srv/images/echo.tar", ImageRef(ARCHIVE, "/srv/images/echo.tar")),
    ("oci-archive:/srv/images/echo.tar:serve", ImageRef(ARCHIVE, "/srv/images/echo.tar", "serve")),
    ("oci-archive:/x.tar:example.com/app:v1", ImageRef(ARCHIVE, "/x.tar", "example.com/app:v1")),
    ("oci:/var/lib/layouts/echo", ImageRef(OCI, "/var/lib/layouts/echo")),
    ("oci:/var/lib/layouts/echo:v1.2", ImageRef(OCI, "/var/lib/layouts/echo", "v1.2")),
    ("docker-archive:/tmp/saved image.tar", ImageRef(DARCHIVE, "/tmp/saved image.tar")),
]


@pytest.mark.parametrize(("text", "want"), GOOD, ids=[t for t, _ in GOOD])
def test_parses(text: str, want: ImageRef) -> None:
    ref = parse(text)
    assert ref == want
    assert str(ref) == text  # what skopeo is given is what the user wrote
    assert ref.local == (want.transport is not DOCKER)


BAD = [
    ("ubuntu:22.04", "does not start with a known transport"),
    ("registry.example.com/team/model:v1", "does not start with a known transport"),
    ("containers-storage:foo", "does not start with a known transport"),
    ("dir:/tmp/x", "does not start with a known transport"),
    ("docker:registry.example.com/a:b", "does not start with a known transport"),
    ("https://registry.example.com/a:b", "does not start with a known transport"),
    ("docker://ubuntu:22.04", "needs a registry host"),
    ("docker://library/ubuntu:22.04", "needs a registry host"),
    ("docker://registry.example.com/team/model", "needs :TAG or @sha256:DIGEST"),
    ("docker://reg.io/a:v1@" + D, "not both"),
    ("docker://reg.io/a@sha256:abc", "bad digest"),
    ("docker://reg.io/a@sha256:" + "AB" * 32, "bad digest"),
    ("docker://reg.io/a@sha512:" + "ab" * 64, "bad digest"),
    ("docker://reg.io/Team/model:v1", "bad repository component 'Team'"),
    ("docker://reg.io//model:v1", "bad repository component ''"),
    ("docker://reg.io/model:-v1", "bad tag"),
    ("docker://reg.io/model:" + "t" * 129, "bad tag"),
    ("docker://reg_io.com/model:v1", "bad registry host"),
    ("docker://reg.io:99999/model:v1", "bad registry host"),
    ("docker://reg.io/" + "a" * 300 + ":v1", "longer than 255"),
    ("oci-archive:images/echo.tar", "must be absolute"),
    ("oci-archive:", "must be absolute"),
    ("oci:~/layout", "must be absolute"),
    ("oci-archive:/srv/../etc/shadow", "may not contain '..'"),
    ("oci:/srv/images/..", "may not contain '..'"),
    ("oci:/srv/./images", "must be normalised"),
    ("oci:/srv//images", "must be normalised"),
    ("oci:/srv/images/", "must be normalised"),
    ("oci://srv/images", "must be normalised"),
    ("oci-archive:/x.tar:", "bad tag"),
    ("oci-archive:/x.tar:a b", "bad tag"),
    ("docker-archive:/x.tar:app:v1", "takes no :TAG"),
    ("oci-archive:/x.tar\0", "control character"),
    ("oci-archive:/x.tar\n", "control character"),
    ("docker://reg.io/a:v1\r", "control character"),
    (" oci:/x", "leading or trailing whitespace"),
    ("oci-archive:/" + "x" * 1100, "at most 1024"),
    ("", "built-in image"),
    (BUILTIN, "built-in image"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[repr(t[:40]) for t, _ in BAD])
def test_refuses_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        parse(text)
    assert caught.value.field == "spec.image"
    assert caught.value.message.startswith("spec.image: ")
    assert message in caught.value.message
    assert "\0" not in caught.value.message and "\n" not in caught.value.message
    assert len(caught.value.message) < 400


@pytest.mark.parametrize(("text", "builtin"), [("", True), ("builtin", True), ("Builtin", False), (" builtin", False),
                                               ("oci:/x", False)])
def test_is_builtin(text: str, builtin: bool) -> None:
    assert is_builtin(text) is builtin


@pytest.mark.parametrize(("text", "pinned"), [
    ("docker://reg.io/a:v1", "docker://reg.io/a@" + D),
    ("docker://reg.io/a@" + D, "docker://reg.io/a@" + D),
    ("oci-archive:/x.tar:v1", "oci-archive:/x.tar:v1"),  # a path cannot say a digest: compared instead
    ("docker-archive:/x.tar", "docker-archive:/x.tar"),
])
def test_pinned(text: str, pinned: str) -> None:
    assert str(parse(text).pinned(D)) == pinned


@pytest.mark.parametrize("text", ["docker://reg.io/a:v1", "oci:/x"])
def test_pinning_to_a_bad_digest_is_refused(text: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="bad digest"):
        parse(text).pinned("sha256:nope")
