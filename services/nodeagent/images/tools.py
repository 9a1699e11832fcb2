"""``SkopeoUmoci``: fetches with ``skopeo`` and unpacks with ``umoci``, each call bounded in time.

- resolve: ``skopeo inspect --raw REF``, the digest being the sha256 of the raw manifest (for a
  multi-platform image, of its index: the digest a registry answers to).
- unpack: ``skopeo copy REF oci:SCRATCH/layout:image`` (any of the four transports, keeping the
  layers compressed), then ``umoci raw unpack`` of that layout into ``dest`` with
  ``--uid-map/--gid-map`` (root) or ``--rootless``. ``raw unpack`` writes the rootfs alone:
  ``umoci unpack`` also hashes every file into an mtree for ``umoci repack``, which we never do,
  and that doubled the time.

skopeo runs with an empty ``HOME`` of its own, our signature policy (accept anything: signature
verification is not implemented yet), ``--tmpdir`` on the cache's disk, and either the secret's
``--authfile`` or ``--no-creds``: a function without a secret never uses credentials lying
around the node. A failure's message ends with the tool's own last words, the auth file's path
replaced by the secret's name. This module is the one place their errors are translated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from services.nodeagent.images.source import ImageSource
from services.nodeagent.images.types import IdMap
from snapwake import errors
from snapwake.imageref import ImageRef, Transport

__all__ = ["SkopeoUmoci", "idmapped_mounts", "parse_features"]

_FIELD = "spec.image"
_LAYOUT_TAG = "image"
_HEX = re.compile(r"sha256:([0-9a-f]{64})")
_SKOPEO_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_NAME_PREFIX = re.compile(r'^Error parsing image name "[^"]*": ')
_TRANSIENT = ("connection refused", "connection reset", "i/o timeout", "no such host", "tls handshake timeout",
              "temporary failure", "too many requests", "503 service unavailable", "502 bad gateway",
              "500 internal server error", "504 gateway", "server misbehaving", "network is unreachable")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class SkopeoUmoci(ImageSource):
    """Runs ``skopeo`` and ``umoci`` with ``workdir`` as their home and temporary space."""

    def __init__(self, workdir: Path, *, skopeo: str = "skopeo", umoci: str = "umoci",
                 insecure_registries: frozenset[str] = frozenset(), env: Mapping[str, str] | None = None) -> None:
        self.workdir, self.skopeo, self.umoci = Path(workdir), skopeo, umoci
        # Registries (host[:port]) reached over plain HTTP or with unverified TLS.
        self.insecure_registries = insecure_registries
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.policy = self.workdir / "policy.json"
        self.policy.write_text(json.dumps(_POLICY))
        self.env = {"PATH": _PATH, **(env or {}), "HOME": str(self.workdir)}

    async def resolve(self, ref: ImageRef, authfile: Path | None, timeout: float) -> str:
        out = await self._run([self.skopeo, *self._global(), "inspect", "--raw", *self._auth(ref, authfile, ""),
                               str(ref)], timeout, f"cannot fetch {ref}", authfile)
        return "sha256:" + hashlib.sha256(out).hexdigest()

    async def unpack(self, ref: ImageRef, authfile: Path | None, dest: Path, owner: IdMap,
                     timeout: float) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        layout = dest.parent / "layout"
        await self._run([self.skopeo, *self._global(), "copy", "--quiet", *self._auth(ref, authfile, "src-"),
                         str(ref), f"oci:{layout}:{_LAYOUT_TAG}"], _left(deadline), f"cannot fetch {ref}", authfile)
        config = read_layout_config(layout, f"cannot fetch {ref}")
        ids = ["--rootless"] if owner.rootless else ["--uid-map", owner.uid_map(), "--gid-map", owner.gid_map()]
        await self._run([self.umoci, "raw", "unpack", *ids, "--image", f"{layout}:{_LAYOUT_TAG}", str(dest)],
                        _left(deadline), f"cannot unpack {ref}", authfile)
        return config

    def _global(self) -> list[str]:
        return ["--policy", str(self.policy), "--tmpdir", str(self.workdir)]

    def _auth(self, ref: ImageRef, authfile: Path | None, prefix: str) -> list[str]:
        if ref.transport is not Transport.DOCKER:
            return []
        host = ref.location.split("/", 1)[0]
        tls = [f"--{prefix}tls-verify=false"] if host in self.insecure_registries else []
        return [*tls, f"--{prefix}authfile", str(authfile)] if authfile else [*tls, f"--{prefix}no-creds"]

    async def _run(self, argv: list[str], timeout: float, what: str, authfile: Path | None) -> bytes:
        """Runs ``argv``; returns its stdout or raises the domain error for its failure."""
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, env=self.env,
                                                        start_new_session=True)
        except OSError as exc:
            raise errors.FailedPrecondition(f"{_FIELD}: {what}: cannot run {argv[0]} ({exc.strerror}); install "
                                            f"the Debian package {Path(argv[0]).name}", field=_FIELD) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), max(timeout, 0.001))
        except BaseException as exc:  # timed out or cancelled: the tool must not outlive the call
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(f"{_FIELD}: {what}: timed out after {timeout:.0f}s",
                                              field=_FIELD) from None
            raise
        if proc.returncode:
            raise translate(what, err.decode(errors="replace"), authfile)
        return out


def translate(what: str, stderr: str, authfile: Path | None) -> errors.SnapwakeError:
    """The domain error for a failed skopeo or umoci run, ending with the tool's message."""
    said = last_words(stderr)
    if authfile is not None:
        said = said.replace(str(authfile), f"<secret {authfile.stem}>")
    message = f"{_FIELD}: {what}: {said or 'failed without a message'}"
    lowered = said.lower()
    if "no space left" in lowered:
        return errors.ResourceExhausted(message, field=_FIELD)
    if any(marker in lowered for marker in _TRANSIENT):
        return errors.Unavailable(message, field=_FIELD)
    return errors.InvalidArgument(message, field=_FIELD)


def last_words(stderr: str, limit: int = 600) -> str:
    """The gist of a tool's stderr: skopeo's last ``msg="..."``, else its last lines."""
    found = _SKOPEO_MSG.findall(stderr)
    if found:
        text = _NAME_PREFIX.sub("", _ESCAPE.sub(r"\1", found[-1]))  # the caller names the image already
    else:
        lines = [line.strip().lstrip("⨯•").strip() for line in stderr.splitlines() if line.strip()]
        text = " | ".join(lines[-3:])
    return text if len(text) <= limit else "..." + text[-limit:]


def read_layout_config(layout: Path, what: str) -> bytes:
    """The image config JSON of the one image in an OCI layout that skopeo just wrote."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
        return _blob(layout, manifest["config"]["digest"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise errors.InvalidArgument(f"{_FIELD}: {what}: unreadable image layout ({exc})", field=_FIELD) from None


def _blob(layout: Path, digest: object) -> bytes:
    match = _HEX.fullmatch(str(digest))
    if match is None:
        raise ValueError(f"unsupported digest {str(digest)[:80]!r}")
    return (layout / "blobs" / "sha256" / match.group(1)).read_bytes()


def _left(deadline: float) -> float:
    return deadline - asyncio.get_running_loop().time()


def parse_features(text: str) -> bool:
    """Whether an OCI runtime's ``features`` JSON (runtime-spec features.md) says it can make
    id-mapped mounts (``linux.mountExtensions.idmap.enabled``)."""
    try:
        doc = json.loads(text)
        return bool(doc["linux"]["mountExtensions"]["idmap"]["enabled"])
    except (ValueError, KeyError, TypeError):
        return False


def idmapped_mounts(runtime: str = "crun", timeout: float = 5.0) -> bool:
    """Probes ``RUNTIME features`` (crun >= 1.9, runc >= 1.2); False when the runtime is
    missing or too old to say (Debian 12's runc 1.1.5 and crun 1.8.1 both are)."""
    try:
        done = subprocess.run([runtime, "features"], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and parse_features(done.stdout.decode(errors="replace"))
