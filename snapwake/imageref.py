"""Image references: what ``FunctionSpec.image`` may say, parsed without any I/O.

Shared by the scheduler (which refuses a bad reference at deploy, naming ``spec.image``) and
the nodeagent (whose image cache pulls what ``ImageRef.source`` names, with skopeo's transport
syntax). The accepted forms::

    builtin | ""                                  the built-in model server over model_dir
    oci-archive:/abs/path.tar[:ref]               an OCI archive on the node's filesystem
    oci:/abs/layout-dir[:ref]                     an OCI image layout on the node's filesystem
    [docker://][host[:port]/]repo[:tag][@digest]  a registry image; Docker Hub by default

A registry reference is normalised as docker does it: no host means ``docker.io``, a one-part
repository on Docker Hub is ``library/...``, no tag and no digest means ``:latest``. As in
skopeo, a local path ends at its first ``:`` (what follows is the reference inside the archive
or layout), so it may not contain one. Paths must be absolute: the node resolves them on its own
filesystem (the scheduler cannot check that they exist).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from snapwake.errors import InvalidArgument

__all__ = ["BUILTIN", "ImageRef", "is_builtin", "parse"]

BUILTIN = "builtin"
_FIELD = "spec.image"
_MAX_NAME = 255
_DOCKER_HUB = "docker.io"
_LOCAL_TRANSPORTS = ("oci-archive", "oci")
# github.com/distribution/reference's grammar.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:]+\]")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"(?P<alg>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]{32,})")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_LOCAL_REF = re.compile(r"[A-Za-z0-9._/:@+-]{1,255}")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference (never the built-in image)."""

    # "docker" (a registry), "oci-archive" or "oci" (a path on the node).
    transport: str
    # docker: "host/repo/path" (normalised); local transports: the absolute path.
    name: str
    # docker: the tag ("latest" when neither tag nor digest was given); local: the reference
    # inside the archive or layout, "" for its only image.
    tag: str = ""
    # "sha256:..." when the reference pins one (registry images only).
    digest: str = ""

    @property
    def local(self) -> bool:
        """Whether it names a file or directory on the node rather than a registry image."""
        return self.transport in _LOCAL_TRANSPORTS

    @property
    def registry(self) -> str:
        """The registry host (with port) of a registry image, "" for a local one."""
        return "" if self.local else self.name.split("/", 1)[0]

    @property
    def source(self) -> str:
        """The reference in skopeo's transport syntax (``docker://...``, ``oci-archive:...``)."""
        if self.local:
            return f"{self.transport}:{self.name}" + (f":{self.tag}" if self.tag else "")
        return f"docker://{self}"

    def pinned(self, digest: str) -> ImageRef:
        """The same image pinned to ``digest``: a registry image is then pulled by digest (a tag
        that moved since changes nothing); a local one cannot say it and is compared instead."""
        if self.local:
            return self
        return ImageRef(self.transport, self.name, self.tag, digest)

    def __str__(self) -> str:
        if self.local:
            return self.source
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def is_builtin(text: str) -> bool:
    """Whether ``FunctionSpec.image`` means the built-in model server ("" or "builtin")."""
    return text in ("", BUILTIN)


def _bad(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{_FIELD} {text!r} is not a valid image reference: {why}", field=_FIELD)


def parse(text: str) -> ImageRef:
    """Parses a user image reference; ``InvalidArgument`` (field ``spec.image``) saying why not."""
    if is_builtin(text):
        raise _bad(text, "it names the built-in model server, not an image")
    if text != text.strip() or any(c.isspace() or ord(c) < 32 for c in text):
        raise _bad(text, "it contains whitespace or control characters")
    transport, sep, rest = text.partition(":")
    if sep and transport in _LOCAL_TRANSPORTS:
        return _parse_local(text, transport, rest)
    return _parse_docker(text, text.removeprefix("docker://"))


def _parse_local(text: str, transport: str, rest: str) -> ImageRef:
    path, _, ref = rest.partition(":")
    if not path.startswith("/"):
        raise _bad(text, f"the {transport} path must be absolute (the node reads it from its own disk)")
    if "/../" in path + "/" or path.endswith("/.."):
        raise _bad(text, "the path may not contain '..'")
    if ref and not _LOCAL_REF.fullmatch(ref):
        raise _bad(text, f"the reference {ref!r} inside the {transport} has characters skopeo refuses")
    return ImageRef(transport, path, ref)


def _split_host(name: str) -> tuple[str, str]:
    """(host, repository path), with docker's rule: the first part is a host if it has a dot or
    a port, or is ``localhost``; otherwise the image is on Docker Hub."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first, rest
    return _DOCKER_HUB, name


def _check_host(text: str, host: str) -> None:
    hostname, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not hostname:
        hostname, port = host, ""
    if not _HOST.fullmatch(hostname):
        raise _bad(text, f"registry host {hostname!r} is not a host name")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise _bad(text, f"registry port {port!r} is not a port between 1 and 65535")


def _parse_docker(text: str, rest: str) -> ImageRef:
    name, _, digest = rest.partition("@")
    if digest:
        m = _DIGEST.fullmatch(digest)
        if m is None or (m["alg"] in _HEX_LENGTH and (len(m["hex"]) != _HEX_LENGTH[m["alg"]]
                                                       or not re.fullmatch("[0-9a-f]+", m["hex"]))):
            raise _bad(text, f"digest {digest!r} is not algorithm:hex (sha256 takes 64 lowercase hex digits)")
    host, path = _split_host(name)
    tag = ""
    if ":" in path:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise _bad(text, f"tag {tag!r} must be 1-128 characters of [A-Za-z0-9_.-], not starting with . or -")
    if not path:
        raise _bad(text, "the repository name is empty")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise _bad(text, f"repository part {component!r} must be lowercase letters and digits, "
                             "separated by single '.', '_', '__' or dashes")
    _check_host(text, host)
    if host == _DOCKER_HUB and "/" not in path:
        path = "library/" + path
    full = f"{host}/{path}"
    if len(full) > _MAX_NAME:
        raise _bad(text, f"the name is longer than {_MAX_NAME} characters")
    return ImageRef("docker", full, tag or ("" if digest else "latest"), digest)
