"""The image cache's bookkeeping over ``FakeSource`` (the same code runs over skopeo and umoci in
tests/inproc/test_nodeagent_images.py): one unpack per digest, holds, LRU eviction, pins,
deadlines, and the index rebuilt after a restart."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from services.nodeagent.images import FakeImage, FakeSource, ImageCache
from snapwake import errors


def image(n: int, size: int = 4096, **config: object) -> FakeImage:
    return FakeImage(config={"architecture": "amd64", "os": "linux", "config": {"Cmd": [f"/bin/app{n}"], **config}},
                     files={"/bin/app": b"x" * size, "/id": str(n).encode()})


IMAGES = {f"oci:/images/{n}": image(n) for n in range(4)}


def cache(root: Path, max_bytes: int = 1 << 30, delay: float = 0.0, **kw: object) -> ImageCache:
    return ImageCache(root, max_bytes, source=FakeSource(IMAGES, delay=delay), architecture="amd64", **kw)  # type: ignore[arg-type]


async def test_concurrent_pulls_of_one_digest_share_one_unpack(tmp_path: Path) -> None:
    c = cache(tmp_path, delay=0.05)
    same = FakeImage(config=IMAGES["oci:/images/0"].config, files=IMAGES["oci:/images/0"].files)
    c.source.images["oci-archive:/elsewhere.tar:t"] = same  # type: ignore[attr-defined]
    a, b, d = await asyncio.gather(c.pull("oci:/images/0"), c.pull("oci:/images/0"),
                                   c.pull("oci-archive:/elsewhere.tar:t"))
    assert a == b == d
    assert (c.misses, c.hits) == (1, 2)
    assert c.source.unpacked == [a.digest]  # type: ignore[attr-defined]
    assert c.users(a.digest) == 3
    assert (a.rootfs / "id").read_text() == "0"
    assert a.config.cmd == ("/bin/app0",)


async def test_acquire_and_release_count_holders(tmp_path: Path) -> None:
    c = cache(tmp_path)
    img = await c.pull("oci:/images/1", acquire=False)
    assert c.users(img.digest) == 0
    assert c.acquire(img.digest) == img
    c.acquire(img.digest)
    c.release(img.digest)
    assert c.users(img.digest) == 1
    c.release(img.digest)
    c.release(img.digest)  # one too many: logged, not below zero
    assert c.users(img.digest) == 0
    with pytest.raises(errors.FailedPrecondition, match="not in this node's cache"):
        c.acquire("sha256:" + "0" * 64)


async def test_eviction_takes_the_least_recently_used_image_no_one_holds(tmp_path: Path) -> None:
    c = cache(tmp_path)
    held = await c.pull("oci:/images/0")
    old = await c.pull("oci:/images/1", acquire=False)
    recent = await c.pull("oci:/images/2", acquire=False)
    c.max_bytes = held.size_bytes + recent.size_bytes + held.size_bytes // 2
    await c.pull("oci:/images/1", acquire=False)  # a hit makes "old" the most recent
    assert await c.evict() == [recent.digest]
    assert not recent.rootfs.exists() and held.rootfs.exists() and old.rootfs.exists()
    c.max_bytes = 0
    assert await c.evict() == [old.digest]
    assert [i.digest for i in c.images()] == [held.digest]  # held: kept over the bound
    assert os.listdir(tmp_path / "scratch") == []


async def test_an_image_is_not_evicted_before_its_pull_returns_it(tmp_path: Path) -> None:
    c = cache(tmp_path, max_bytes=0, delay=0.02)
    # Over the bound at once: each unpack's eviction runs before its waiters took their holds.
    a, b = await asyncio.gather(c.pull("oci:/images/0"), c.pull("oci:/images/1"))
    assert a.rootfs.exists() and b.rootfs.exists()
    assert (c.users(a.digest), c.users(b.digest)) == (1, 1)
    c.release(a.digest)
    await c.pull("oci:/images/2", acquire=False)
    assert not a.rootfs.exists() and b.rootfs.exists()


async def test_a_pinned_pull_runs_the_pinned_image(tmp_path: Path) -> None:
    c = cache(tmp_path)
    pinned = IMAGES["oci:/images/0"].digest
    with pytest.raises(errors.FailedPrecondition, match="now names sha256:.*, not sha256:.* that the revision is pinned"):
        await c.pull("oci:/images/1", digest=pinned)  # the path holds other content now
    assert (await c.pull("oci:/images/0", digest=pinned)).digest == pinned
    # Once cached, the pinned image is the answer without asking the source (a registry may be down).
    c.source.images.clear()  # type: ignore[attr-defined]
    assert (await c.pull("oci:/images/1", digest=pinned)).digest == pinned
    assert (c.misses, c.hits) == (1, 1)
    with pytest.raises(errors.InvalidArgument, match="bad digest"):
        await c.pull("oci:/images/0", digest="sha256:short")


async def test_a_pull_past_its_deadline_fails_and_the_unpack_still_lands(tmp_path: Path) -> None:
    c = cache(tmp_path, delay=0.3)
    with pytest.raises(errors.DeadlineExceeded, match="took longer than allowed"):
        await c.pull("oci:/images/3", timeout=0.05)
    for _ in range(250):
        if c.images():
            break
        await asyncio.sleep(0.02)
    await c.pull("oci:/images/3", timeout=0.05)
    assert (c.misses, c.hits) == (1, 1)


async def test_an_image_for_another_platform_is_refused(tmp_path: Path) -> None:
    c = ImageCache(tmp_path, 1 << 30, source=FakeSource(IMAGES), architecture="arm64")
    with pytest.raises(errors.InvalidArgument, match="built for linux/amd64; this node runs linux/arm64"):
        await c.pull("oci:/images/0")
    assert c.images() == [] and os.listdir(tmp_path / "scratch") == []


async def test_close_cancels_unpacks_under_way(tmp_path: Path) -> None:
    c = cache(tmp_path, delay=5)
    pull = asyncio.ensure_future(c.pull("oci:/images/0"))
    await asyncio.sleep(0.05)
    await c.close()
    with pytest.raises(asyncio.CancelledError):
        await pull
    assert c.images() == [] and os.listdir(tmp_path / "scratch") == []


async def test_a_restart_rebuilds_the_index_and_discards_the_rest(tmp_path: Path) -> None:
    c = cache(tmp_path)
    first = await c.pull("oci:/images/0")
    second = await c.pull("oci:/images/1")
    foreign = await c.pull("oci:/images/2")
    await c.pull("oci:/images/0")  # now the most recently used
    images = tmp_path / "images"
    # What a crash or another configuration leaves behind.
    (tmp_path / "scratch" / "half-unpacked" / "entry" / "rootfs").mkdir(parents=True)
    (images / ("sha256-" + "1" * 64) / "rootfs").mkdir(parents=True)  # no image.json
    (images / "not-a-digest").mkdir()
    meta_path = foreign.rootfs.parent / "image.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "owner": [1, 1, 7]}))  # other id_base

    again = cache(tmp_path)
    assert again.images() == [second, first]  # least recently used first, as before
    assert sorted(os.listdir(images)) == sorted(p.rootfs.parent.name for p in (first, second))
    assert os.listdir(tmp_path / "scratch") == []
    assert again.users(first.digest) == 0  # holds are the nodeagent's to re-acquire
    await again.pull("oci:/images/0")
    assert (again.misses, again.hits) == (0, 1)


async def test_local_references_stay_inside_the_local_roots(tmp_path: Path) -> None:
    images = tmp_path / "images-in"
    images.mkdir()
    (images / "escape").symlink_to("/etc")
    source = FakeSource({f"oci:{images}/0": image(0), "oci:/etc/x": image(1), f"oci:{images}/escape/x": image(2)})
    c = ImageCache(tmp_path / "cache", 1 << 30, local_roots=[images], source=source, architecture="amd64")
    assert (await c.pull(f"oci:{images}/0")).rootfs.is_dir()
    for outside in ("oci:/etc/x", f"oci:{images}/escape/x"):
        with pytest.raises(errors.InvalidArgument, match="outside the directories this node serves local images"):
            await c.pull(outside)
