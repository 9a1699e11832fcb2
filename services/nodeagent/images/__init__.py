"""The node's image pipeline: user ("bring your own") OCI images from reference to rootfs.

    spec.image text ─imageref.parse─▶ ImageRef ──┐                     (pure; InvalidArgument)
    spec.registry_secret ──secrets.authfile──▶ auth file path ──┐  (by name, never contents)
                                                               ▼
    ImageCache.pull ──source.resolve──▶ manifest digest ──▶ cached? ── yes ──▶ Image (hit)
                                                              │ no (one unpack per digest)
                      source.unpack: skopeo copy → OCI layout → umoci raw unpack
                                                              ▼
                      scratch/…/rootfs ──rename──▶ images/sha256-<hex>/rootfs ──▶ Image
    Image.config ──config.command(config, spec.command, spec.args)──▶ argv
    Image.config.user ──user.resolve_user(user, Image.rootfs)──▶ (uid, gid)

Digest pinning: ``pull`` returns the digest the reference resolved to; a revision records it
and passes it back as ``pull(..., digest=)`` for every later instance: a cached pinned image
is used without asking the source, an uncached one is fetched by digest from a registry, and
a local path that now holds something else fails.

Rootfs sharing, decided: ONE read-only rootfs per digest, shared by every instance of the
image, with all instance containers in the SAME user-namespace mapping. Run as root, the cache
unpacks with ``umoci --uid-map/--gid-map 0:id_base:65536`` (``id_base`` defaults to 100000), so
container id n is host id ``id_base + n``; ``Image.owner`` says so. What the sandbox must do:
map container ids 0..65535 to host ``owner.uid``/``owner.gid`` onward (uidMappings and
gidMappings ``{containerID: 0, hostID: owner.uid, size: owner.size}``), use ``Image.rootfs`` as
the root with ``root.readonly: true``, give writable space with tmpfs mounts or an overlay
whose lower dir is ``Image.rootfs`` and whose upper and work dirs live in the instance dir (one
mount, no copy), and keep every ancestor of the cache root searchable (o+x) by those ids.

Its cost: instances do not get host ids of their own, so a process that escapes its container
holds the same host identity as every other instance's (of any function or tenant); keeping
instances apart rests on the mount, pid and network namespaces, seccomp and cgroups, not on file
ownership. The image tree must stay read-only (an image writing outside tmpfs or an overlay
fails), and ids above 65535 in an image cannot be unpacked. What it buys: one unpack per node
per digest and no per-start chown or copy (an inference image is GBs: a copy per start costs
minutes and its size per instance; the 170 MB Debian test image takes ~7 s to unpack here).
Per-instance mappings over one rootfs need id-mapped mounts: Debian 12's runc 1.1.5 has none,
its crun 1.8.1 cannot report them (no ``crun features``); ``idmapped_mounts()`` probes a
runtime, and once one says yes the sandbox can give each instance its own range on the same
cache, the files staying as they are and each mount mapping them.
"""

from services.nodeagent.images.cache import ImageCache, host_architecture
from services.nodeagent.images.config import ImageConfig, command, parse_config
from services.nodeagent.images.eviction import Usage, plan_eviction
from services.nodeagent.images.fake import FakeImage, FakeSource
from services.nodeagent.images.image import Image
from services.nodeagent.images.secrets import authfile
from services.nodeagent.images.source import ImageSource
from services.nodeagent.images.tools import SkopeoUmoci, idmapped_mounts
from services.nodeagent.images.types import IdMap
from services.nodeagent.images.user import parse_user, resolve_user
from snapwake.imageref import BUILTIN, ImageRef, Transport, is_builtin, parse

__all__ = [
    "BUILTIN", "FakeImage", "FakeSource", "IdMap", "Image", "ImageCache", "ImageConfig", "ImageRef", "ImageSource",
    "SkopeoUmoci", "Transport", "Usage", "authfile", "command", "host_architecture", "idmapped_mounts",
    "is_builtin", "parse", "parse_config", "parse_user", "plan_eviction", "resolve_user",
]
