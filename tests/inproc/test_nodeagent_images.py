"""The node's image pipeline with the real skopeo and umoci: the Debian test image (built once per
session) and tiny images made here, pulled through every local transport."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from oci_image import SERVED_MODEL, TestImage, build_tiny_image
from oci_registry import RegistryProcess

from services.nodeagent.images import Image, ImageCache, SkopeoUmoci, command, parse_config, resolve_user
from snapwake import errors
from snapwake.testing import free_port, wait_for

# No skip when the tools are missing: `make install` installs them (Makefile APT_PACKAGES), and a
# missing tool must fail CI, not hide these tests.

ROOT = os.geteuid() == 0
SERVER = Path(__file__).parents[1] / "oci_server.py"


@pytest.fixture(scope="module")
def served(debian_python_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageCache, Image]:
    """A cache that pulled the "serve" variant twice at once, by archive and by layout."""
    cache = ImageCache(tmp_path_factory.mktemp("served") / "cache", 1 << 40)

    async def pull_twice() -> Image:
        a, b = await asyncio.gather(cache.pull(debian_python_image.ref("serve")),
                                    cache.pull(debian_python_image.ref("serve", transport="oci")))
        assert a == b
        return a
    return cache, asyncio.run(pull_twice())


def test_a_pull_resolves_the_digest_and_unpacks_the_image(debian_python_image: TestImage,
                                                         served: tuple[ImageCache, Image]) -> None:
    cache, image = served
    assert image.digest == debian_python_image.digests["serve"]
    assert (cache.misses, cache.hits) == (1, 1)  # the concurrent pulls shared one unpack
    assert cache.users(image.digest) == 2
    rootfs = image.rootfs
    assert os.path.islink(rootfs / "usr/bin/python3") and (rootfs / "usr/bin/python3.11").is_file()
    assert (rootfs / "srv/server.py").read_bytes() == SERVER.read_bytes()
    assert 30 << 20 < image.size_bytes < 400 << 20
    if ROOT:  # container ids 0.. are host ids 100000..
        assert image.owner.uid == image.owner.gid == 100_000
        assert (os.lstat(rootfs / "srv/server.py").st_uid, os.lstat(rootfs / "srv/server.py").st_gid) == (100_000,) * 2
    config = image.config
    assert command(config) == ["python3", "/srv/server.py", "--port", "8000"]
    assert command(config, override_args=["--port", "9000"]) == ["python3", "/srv/server.py", "--port", "9000"]
    assert (config.exposed_ports, config.working_dir, config.user) == ((8000,), "/srv", "nobody")
    assert config.env["SERVED_MODEL_NAME"] == SERVED_MODEL and "PATH" in config.env
    assert resolve_user(config.user, rootfs) == (65534, 65534)


def test_the_same_content_by_another_path_and_tag_is_a_hit(debian_python_image: TestImage, tmp_path: Path,
                                                           served: tuple[ImageCache, Image]) -> None:
    cache, image = served
    other = tmp_path / "copied.tar"
    _skopeo("copy", debian_python_image.ref("serve", transport="oci"), f"oci-archive:{other}:another-tag")
    misses, hits = cache.misses, cache.hits
    again = asyncio.run(cache.pull(f"oci-archive:{other}:another-tag", acquire=False))
    assert again == image
    assert (cache.misses, cache.hits) == (misses, hits + 1)


@pytest.mark.skipif(not ROOT, reason="chroot needs root")
def test_the_server_runs_from_the_unpacked_rootfs(served: tuple[ImageCache, Image]) -> None:
    """Not a container (that is the sandbox's): a chroot as the image's user shows the rootfs
    holds a working python3 and server."""
    _, image = served
    port = free_port()
    env = {**image.config.env, "HOME": "/"}
    argv = command(image.config, override_args=["--port", str(port), "--host", "127.0.0.1"])
    uid, gid = resolve_user(image.config.user, image.rootfs)
    with _running(["chroot", f"--userspec={image.owner.uid + uid}:{image.owner.gid + gid}", str(image.rootfs),
                   "/bin/sh", "-c", f'cd {image.config.working_dir} && exec "$@"', "sh", *argv], env) as proc:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, 30,
                 f"the image's server (pid {proc.pid})")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [SERVED_MODEL]
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          json={"model": "x", "messages": [{"role": "user", "content": "hello there"}]}).json()
        assert chat["choices"][0]["message"]["content"] == "echo: hello there"


def test_the_variants_commands(debian_python_image: TestImage) -> None:
    def config(variant: str) -> list[str]:
        return command(parse_config(_skopeo("inspect", "--config", debian_python_image.ref(variant, "oci"))))
    assert config("exits")[:2] == ["/bin/sh", "-c"]
    assert config("no-port")[:2] == ["python3", "-c"]
    with pytest.raises(errors.InvalidArgument, match="image has no command"):
        config("no-command")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three small distinct images (256 KiB each) in one layout, and "a" as a docker-archive."""
    layout = tmp_path_factory.mktemp("tiny") / "layout"
    digests = {tag: build_tiny_image(layout, tag, {"/data/blob": os.urandom(256 << 10), "/tag": tag.encode()},
                                     f"--config.cmd=/bin/{tag}") for tag in ("a", "b", "c")}
    archive = layout.parent / "a-docker.tar"
    _skopeo("copy", f"oci:{layout}:a", f"docker-archive:{archive}")
    return {"layout": layout, "digests": digests, "docker_archive": archive}


def test_a_docker_archive_pulls_and_pins(tiny: dict[str, object], tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", 1 << 30)
    ref = f"docker-archive:{tiny['docker_archive']}"
    image = asyncio.run(cache.pull(ref))
    # A docker-archive's manifest is made by skopeo from the tarball, the same every time.
    assert image.digest == "sha256:" + hashlib.sha256(_skopeo("inspect", "--raw", ref)).hexdigest()
    assert (image.rootfs / "tag").read_text() == "a" and image.config.cmd == ("/bin/a",)
    assert asyncio.run(cache.pull(ref, digest=image.digest)) == image
    layout, digests = tiny["layout"], tiny["digests"]
    assert isinstance(digests, dict)
    with pytest.raises(errors.FailedPrecondition, match=f"oci:{layout}:b now names {digests['b']}, not"):
        asyncio.run(cache.pull(f"oci:{layout}:b", digest=digests["c"]))
    assert (cache.misses, cache.hits) == (1, 1)


def test_eviction_under_a_small_bound_removes_only_unused_images(tiny: dict[str, object], tmp_path: Path) -> None:
    layout = tiny["layout"]
    cache = ImageCache(tmp_path / "cache", 1 << 30)

    async def scenario() -> tuple[Image, Image, Image]:
        a = await cache.pull(f"oci:{layout}:a")  # held by an instance throughout
        b = await cache.pull(f"oci:{layout}:b")
        cache.release(b.digest)
        cache.max_bytes = a.size_bytes + b.size_bytes + a.size_bytes // 2
        c = await cache.pull(f"oci:{layout}:c")  # over the bound: b goes, a (older, held) stays
        return a, b, c
    a, b, c = asyncio.run(scenario())
    assert [i.digest for i in cache.images()] == [a.digest, c.digest]
    assert a.rootfs.is_dir() and c.rootfs.is_dir() and not b.rootfs.parent.exists()
    assert sorted(os.listdir(tmp_path / "cache" / "images")) == sorted(i.rootfs.parent.name for i in (a, c))


def test_a_restart_rebuilds_the_index_from_disk(tiny: dict[str, object], tmp_path: Path) -> None:
    layout, root = tiny["layout"], tmp_path / "cache"
    cache = ImageCache(root, 1 << 30)
    a = asyncio.run(cache.pull(f"oci:{layout}:a"))
    (root / "scratch" / "torn-unpack" / "entry" / "rootfs" / "usr").mkdir(parents=True)  # a crash mid-unpack
    restarted = ImageCache(root, 1 << 30)
    assert restarted.images() == [a]
    assert os.listdir(root / "scratch") == []
    again = asyncio.run(restarted.pull(f"oci:{layout}:a"))
    assert again == a and (restarted.misses, restarted.hits) == (0, 1)


def _corrupt_layer(tiny: dict[str, object], tmp_path: Path) -> str:
    """A copy of image "a" whose layer blob is cut short: its manifest reads fine, the copy fails."""
    copy = tmp_path / "corrupt"
    shutil.copytree(str(tiny["layout"]), copy)
    index = json.loads((copy / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "a")
    manifest = json.loads((copy / "blobs/sha256" / entry["digest"][7:]).read_text())
    biggest = max(manifest["layers"], key=lambda layer: layer["size"])
    layer = copy / "blobs/sha256" / biggest["digest"][7:]
    layer.write_bytes(layer.read_bytes()[: biggest["size"] // 2])
    return f"oci:{copy}:a"


FAILURES = [
    # (reference, or a function of the fixtures making one; error class; message part)
    ("oci-archive:/nonexistent/image.tar", errors.InvalidArgument,
     "spec.image: cannot fetch oci-archive:/nonexistent/image.tar: "),
    (lambda tiny, tmp: _write(tmp / "garbage.tar", b"not a tar" * 100), errors.InvalidArgument, "cannot fetch oci-archive:"),
    (lambda tiny, tmp: f"oci:{tiny['layout']}:nope", errors.InvalidArgument, 'no descriptor found for reference "nope"'),
    (_corrupt_layer, errors.InvalidArgument, "cannot fetch oci:"),
    ("oci-archive:relative/image.tar", errors.InvalidArgument, "path must be absolute"),
    ("docker://localhost:1/echo:v1", errors.Unavailable, "connection refused"),
]


@pytest.mark.parametrize(("ref", "kind", "message"), FAILURES,
                         ids=["missing-file", "not-a-tar", "missing-tag", "corrupt-layer", "relative", "no-registry"])
def test_a_bad_image_fails_with_a_clear_message(tiny: dict[str, object], tmp_path: Path, ref: object,
                                                 kind: type[errors.SnapwakeError], message: str) -> None:
    text = ref(tiny, tmp_path) if callable(ref) else str(ref)
    cache = ImageCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(kind) as caught:
        asyncio.run(cache.pull(text, timeout=60))
    assert caught.value.field == "spec.image"
    assert message in caught.value.message
    assert cache.images() == [] and os.listdir(tmp_path / "cache" / "scratch") == []


def test_registry_secrets_are_passed_by_reference(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "team-a.json").write_text(json.dumps({"auths": {"localhost:1": {"auth": "dXNlcjpzM2NyM3Q="}}}))
    cache = ImageCache(tmp_path / "cache", 1 << 30, secrets_dir=secrets)
    with pytest.raises(errors.FailedPrecondition, match="secret 'team-b' is not registered on this node"):
        asyncio.run(cache.pull("docker://localhost:1/echo:v1", secret="team-b"))
    with pytest.raises(errors.InvalidArgument, match="bad secret name"):
        asyncio.run(cache.pull("docker://localhost:1/echo:v1", secret="../secrets/team-a"))
    with pytest.raises(errors.Unavailable) as caught:  # skopeo took the auth file and tried the registry
        asyncio.run(cache.pull("docker://localhost:1/echo:v1", secret="team-a"))
    assert "connection refused" in caught.value.message
    assert str(secrets) not in caught.value.message and "s3cr3t" not in caught.value.message


def test_a_stuck_fetch_is_bounded(tmp_path: Path) -> None:
    fifo = tmp_path / "never.tar"
    os.mkfifo(fifo)  # skopeo blocks opening it: nothing ever writes
    cache = ImageCache(tmp_path / "cache", 1 << 30)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match=f"cannot fetch oci-archive:{fifo}: timed out"):
        asyncio.run(cache.pull(f"oci-archive:{fifo}", timeout=1.0))
    assert time.monotonic() - started < 10


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return f"oci-archive:{path}"


def _skopeo(*args: str) -> bytes:
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True, timeout=120).stdout


@contextlib.contextmanager
def _running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_a_registry_image_pulls_with_its_secret_and_stays_pinned(tiny: dict[str, object], tmp_path: Path) -> None:
    """docker:// against a real registry with htpasswd users: the secret's auth file is used, a
    missing one fails clearly, and a pinned revision keeps its image after the tag moved."""
    layout, digests = tiny["layout"], tiny["digests"]
    assert isinstance(digests, dict)
    with RegistryProcess(tmp_path / "registry", {"alice": "s3cr3t"}) as registry:
        registry.push(f"oci:{layout}:a", "team/echo:v1", "alice")
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        registry.authfile(secrets / "team-a.json", "alice")
        root = tmp_path / "cache"
        cache = ImageCache(root, 1 << 30, secrets_dir=secrets,
                           source=SkopeoUmoci(root / "tools", insecure_registries=frozenset({registry.host})))
        ref = f"docker://{registry.host}/team/echo:v1"
        with pytest.raises(errors.InvalidArgument, match=f"cannot fetch {ref}: .*(unauthorized|authentication)"):
            asyncio.run(cache.pull(ref))
        v1 = asyncio.run(cache.pull(ref, secret="team-a"))
        assert v1.digest == digests["a"] and (v1.rootfs / "tag").read_text() == "a"

        registry.push(f"oci:{layout}:b", "team/echo:v1", "alice")  # the tag moves
        pinned = asyncio.run(cache.pull(ref, secret="team-a", digest=v1.digest))
        assert pinned == v1 and cache.misses == 1
        by_digest = asyncio.run(cache.pull(f"docker://{registry.host}/team/echo@{v1.digest}", secret="team-a"))
        assert by_digest == v1
        moved = asyncio.run(cache.pull(ref, secret="team-a"))
        assert moved.digest == digests["b"] and (moved.rootfs / "tag").read_text() == "b"
        assert (cache.misses, cache.hits) == (2, 2)

        with pytest.raises(errors.InvalidArgument, match="manifest unknown") as caught:
            asyncio.run(cache.pull(f"docker://{registry.host}/team/echo:v2", secret="team-a"))
        assert "s3cr3t" not in caught.value.message and str(secrets) not in caught.value.message
