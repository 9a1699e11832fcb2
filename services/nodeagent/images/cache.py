"""``ImageCache``: the node's unpacked user images, keyed by manifest digest.

A pull resolves the reference to its digest first (cheap: one manifest read), so any reference
to content already here (another function, revision, path or tag) is a hit that fetches and
unpacks nothing, and concurrent pulls of one digest wait on one unpack. On disk (entries.py)::

    {root}/images/sha256-<hex>/rootfs/    shared read-only by the image's instances
    {root}/scratch/                       unpacks in progress (emptied at start)
    {root}/tools/                         skopeo's home and temporary space

Reference counts live in memory: a restarted nodeagent ``acquire``s the digests of the
instances it adopts before it pulls anything, or eviction may take their rootfs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.nodeagent.images.config import ImageConfig, parse_config
from services.nodeagent.images.disk import remove_tree
from services.nodeagent.images.entries import DiskIndex
from services.nodeagent.images.eviction import Usage, plan_eviction
from services.nodeagent.images.image import Image
from services.nodeagent.images.secrets import authfile
from services.nodeagent.images.source import ImageSource
from services.nodeagent.images.tools import SkopeoUmoci
from services.nodeagent.images.types import IdMap
from snapwake import errors
from snapwake.imageref import FIELD, ImageRef, parse

__all__ = ["Image", "ImageCache", "host_architecture"]

log = logging.getLogger(__name__)

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_architecture() -> str:
    """This machine's architecture as OCI images name it (Go's GOARCH)."""
    machine = platform.machine()
    return _GO_ARCH.get(machine, machine)


@dataclass
class _Entry:
    image: Image
    refs: int = 0
    last_used: int = 0


class ImageCache:
    """Unpacked images under ``root``, at most ``max_bytes`` of those no instance uses.

    ``id_base``: run as root, rootfs files are owned by host ids ``id_base + n`` (container id
    ``n < 65536``); as another user they belong to that user (``owner.rootless``).
    ``secrets_dir`` holds the registry secrets (``secrets.py``); ``local_roots``, when given, are
    the only directories local references (oci-archive:, oci:, docker-archive:) may name, so a
    tenant cannot make the node read its other files; ``source`` defaults to skopeo and umoci.
    The constructor reads the index from disk (blocking): make it before serving.
    """

    def __init__(self, root: Path, max_bytes: int, secrets_dir: Path | None = None, *, id_base: int = 100_000,
                 local_roots: Sequence[Path] | None = None, source: ImageSource | None = None,
                 architecture: str = "") -> None:
        self.root, self.max_bytes, self.secrets_dir = Path(root), max_bytes, secrets_dir
        self.local_roots = None if local_roots is None else tuple(os.path.realpath(p) for p in local_roots)
        euid = os.geteuid()
        self.owner = IdMap(id_base, id_base) if euid == 0 else IdMap(euid, os.getegid(), 1)
        self.architecture = architecture or host_architecture()
        self._disk = DiskIndex(self.root, self.owner)
        self.source = source or SkopeoUmoci(self.root / "tools")
        # Pulls answered without an unpack of their own (cached, or sharing one under way).
        self.hits = 0
        # Unpacks started.
        self.misses = 0
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[Image]] = {}
        # Pulls waiting on an unpack of this digest: eviction leaves it alone.
        self._waiting: collections.Counter[str] = collections.Counter()
        self._clock = 0
        for image in self._disk.load():
            self._entries[image.digest] = _Entry(image, last_used=self._tick())

    # ---- the API ----------------------------------------------------------------------------

    async def pull(self, text: str, *, secret: str | None = None, digest: str = "", timeout: float = 600.0,
                   acquire: bool = True) -> Image:
        """The image ``text`` names (``ref.parse`` syntax), fetched and unpacked unless cached.

        ``secret``: the registry secret to authenticate with. ``digest``: the revision's pin; when
        cached, that image is the answer without asking the source at all (the registry may be
        down); otherwise a registry image is fetched by it, and a reference that resolves to
        another digest fails (``FailedPrecondition``). With ``acquire`` the image comes held
        (``release`` it).
        """
        deadline = asyncio.get_running_loop().time() + timeout
        ref = parse(text)
        source_ref = ref.pinned(digest) if digest else ref
        self._check_local(ref)
        auth = authfile(self.secrets_dir, secret) if secret else None
        resolved = digest if digest in self._entries else await self.source.resolve(source_ref, auth, timeout)
        if digest and resolved != digest:
            raise errors.FailedPrecondition(f"{FIELD}: {ref} now names {resolved}, not {digest} that the "
                                            "revision is pinned to", field=FIELD)
        entry = self._entries.get(resolved)
        if entry is None:
            await self._wait_unpack(ref.pinned(resolved), auth, resolved, deadline)
            entry = self._entries[resolved]
        else:
            self.hits += 1
        if acquire:
            entry.refs += 1
        self._touch(entry)
        return entry.image

    def acquire(self, digest: str) -> Image:
        """Marks a cached image as used by one more instance; ``FailedPrecondition`` when it is
        not cached (pull it)."""
        entry = self._entries.get(digest)
        if entry is None:
            raise errors.FailedPrecondition(f"{FIELD}: image {digest} is not in this node's cache", field=FIELD)
        entry.refs += 1
        self._touch(entry)
        return entry.image

    def release(self, digest: str) -> None:
        """One instance stopped using the image; it stays cached, and becomes evictable at zero."""
        entry = self._entries.get(digest)
        if entry is None or entry.refs == 0:
            log.warning("image %s released more often than acquired", digest)
            return
        entry.refs -= 1
        self._touch(entry)

    def users(self, digest: str) -> int:
        """How many holders the image has (0 when not cached)."""
        entry = self._entries.get(digest)
        return entry.refs if entry else 0

    def images(self) -> list[Image]:
        """The cached images, least recently used first."""
        return [e.image for e in sorted(self._entries.values(), key=lambda e: e.last_used)]

    @property
    def size_bytes(self) -> int:
        """Disk taken by all cached images."""
        return sum(e.image.size_bytes for e in self._entries.values())

    async def evict(self) -> list[str]:
        """Removes least recently used images no one holds until the cache fits ``max_bytes``
        (done after every unpack); returns their digests."""
        usage = [Usage(d, e.image.size_bytes, e.refs > 0 or self._waiting[d] > 0, e.last_used)
                 for d, e in self._entries.items()]
        victims = plan_eviction(usage, self.max_bytes)
        doomed = [self._disk.retire(self._entries.pop(d).image.rootfs.parent) for d in victims]
        for digest in victims:
            log.info("image %s evicted", digest)
        if self.size_bytes > self.max_bytes:
            log.warning("image cache holds %d bytes in use, over its bound of %d", self.size_bytes, self.max_bytes)
        for path in doomed:
            await asyncio.to_thread(remove_tree, path)
        return victims

    async def close(self) -> None:
        """Cancels unpacks under way (their scratch directories are removed)."""
        for future in list(self._inflight.values()):
            future.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # ---- misses -----------------------------------------------------------------------------

    async def _wait_unpack(self, ref: ImageRef, auth: Path | None, digest: str, deadline: float) -> None:
        """Waits, within ``deadline``, for the one unpack of ``digest`` (starting it if needed)."""
        future = self._inflight.get(digest)
        if future is None:
            self.misses += 1
            future = asyncio.ensure_future(self._unpack(ref, auth, digest, deadline))
            self._inflight[digest] = future
            future.add_done_callback(lambda f: self._unpacked(digest, f))
        else:
            self.hits += 1
        self._waiting[digest] += 1
        try:
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(asyncio.shield(future), max(left, 0.001))
        except TimeoutError:
            raise errors.DeadlineExceeded(f"{FIELD}: pulling {ref} took longer than allowed", field=FIELD) from None
        finally:
            self._waiting[digest] -= 1
            if not self._waiting[digest]:
                del self._waiting[digest]

    def _unpacked(self, digest: str, future: asyncio.Future[Image]) -> None:
        self._inflight.pop(digest, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so an unpack everyone gave up on logs no warning

    async def _unpack(self, ref: ImageRef, auth: Path | None, digest: str, deadline: float) -> Image:
        work = await asyncio.to_thread(self._disk.stage, digest)
        try:
            left = deadline - asyncio.get_running_loop().time()
            raw = await self.source.unpack(ref, auth, work / "entry" / "rootfs", self.owner, left)
            config = parse_config(raw)
            self._check_platform(ref, config)
            meta = {"config": json.loads(raw), "ref": str(ref)}
            rootfs, size = await asyncio.to_thread(self._disk.commit, work / "entry", digest, meta)
        finally:
            await asyncio.to_thread(remove_tree, work)
        image = Image(digest, rootfs, config, size, self.owner)
        self._entries[digest] = _Entry(image, last_used=self._tick())
        log.info("image %s unpacked from %s: %d bytes", digest, ref, size)
        await self.evict()
        return image

    def _check_local(self, ref: ImageRef) -> None:
        if not ref.local or self.local_roots is None:
            return
        real = os.path.realpath(ref.location)  # a symlink under a root may not lead out of it
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.local_roots):
            raise errors.InvalidArgument(f"{FIELD}: {ref.transport}:{ref.location} is outside the directories this "
                                         "node serves local images from", field=FIELD)

    def _check_platform(self, ref: ImageRef, config: ImageConfig) -> None:
        if config.os != "linux" or config.architecture not in ("", self.architecture):
            raise errors.InvalidArgument(f"{FIELD}: {ref} is built for {config.os}/{config.architecture}; this "
                                         f"node runs linux/{self.architecture}", field=FIELD)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = self._tick()
        self._disk.touch(entry.image)

