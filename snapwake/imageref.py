"""Image references: what a function's ``spec.image`` may say, parsed without any I/O.

The accepted forms are skopeo's transport syntax, so ``str(ref)`` is what skopeo is given::

    builtin | ""                                 the built-in model server (not an ImageRef)
    docker://HOST[:PORT]/REPO:TAG                a registry image by tag
    docker://HOST[:PORT]/REPO@sha256:<64 hex>    a registry image by manifest digest
    oci-archive:/ABS/PATH[:TAG]                  a tar of an OCI image layout on the node
    oci:/ABS/DIR[:TAG]                           an OCI image layout directory on the node
    docker-archive:/ABS/PATH                     what ``docker save`` writes, on the node

Stricter than the docker CLI on purpose: a revision records the text it was given beside the
digest it resolved, so there is one spelling per image: no implicit registry (Docker Hub) and
no implicit ``:latest``. As in skopeo, a local path ends at its first ``:`` and may not contain
one; it must be absolute and normalised (the node resolves it on its own disk). This module
imports nothing but the error tree, so it can move to ``snapwake/`` for the scheduler and CLI.
"""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass

from snapwake import errors

__all__ = ["BUILTIN", "FIELD", "ImageRef", "MAX_LENGTH", "Transport", "is_builtin", "parse"]

BUILTIN = "builtin"
FIELD = "spec.image"
MAX_LENGTH = 1024
_MAX_NAME = 255  # github.com/distribution/reference's NameTotalLengthMax
# github.com/distribution/reference's grammar (lowercase repository path components).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:]+\])(?::(?P<port>[0-9]{1,5}))?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The OCI ref.name annotation grammar (image-spec annotations.md), as containers/image checks it.
_OCI_NAME = re.compile(r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*")


class Transport(enum.StrEnum):
    """Where an image comes from (skopeo's transport names)."""

    DOCKER = "docker"  # a registry speaking the Docker/OCI distribution API
    OCI_ARCHIVE = "oci-archive"  # a tar of an OCI image layout
    OCI = "oci"  # an OCI image layout directory
    DOCKER_ARCHIVE = "docker-archive"  # a `docker save` tarball


_TRANSPORTS = frozenset(t.value for t in Transport)
_LOCAL_TAGGABLE = (Transport.OCI_ARCHIVE, Transport.OCI)
_EXPECTED = "docker://HOST/REPO:TAG, docker://HOST/REPO@sha256:DIGEST, oci-archive:/PATH[:TAG], " \
            "oci:/DIR[:TAG] or docker-archive:/PATH"


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference to a user image (never the built-in one)."""

    transport: Transport
    # docker: "host[:port]/repo/path"; the other transports: the absolute path on the node.
    location: str
    # docker: the tag, "" when pulled by digest; oci-archive/oci: the image's ref.name in the
    # layout, "" for its only image; docker-archive: always "".
    tag: str = ""
    # "sha256:<64 hex>" when the reference names a digest (docker only).
    digest: str = ""

    @property
    def local(self) -> bool:
        """Whether it names a file or directory on the node rather than a registry image."""
        return self.transport is not Transport.DOCKER

    def pinned(self, digest: str) -> ImageRef:
        """The reference to fetch when the revision is pinned to ``digest``: a registry image by
        that digest (a tag that moved since changes nothing); a local one as it is, its resolved
        digest compared with the pin instead (a path cannot name a digest)."""
        _digest(digest)
        return self if self.local else ImageRef(self.transport, self.location, "", digest)

    def __str__(self) -> str:
        if self.transport is Transport.DOCKER:
            return f"docker://{self.location}" + (f"@{self.digest}" if self.digest else f":{self.tag}")
        return f"{self.transport}:{self.location}" + (f":{self.tag}" if self.tag else "")


def is_builtin(text: str) -> bool:
    """Whether ``spec.image`` selects the built-in model server ("builtin" or empty)."""
    return text in ("", BUILTIN)


def parse(text: str) -> ImageRef:
    """Parses a user image reference; raises ``InvalidArgument`` (field ``spec.image``) naming
    what is wrong with it."""
    _check_text(text)
    transport, colon, rest = text.partition(":")
    if transport == Transport.DOCKER and rest.startswith("//"):
        return _parse_docker(rest[2:])
    if not colon or transport not in _TRANSPORTS or transport == Transport.DOCKER:
        raise _bad(f"{_quote(text)} does not start with a known transport; expected {_EXPECTED}")
    return _parse_local(Transport(transport), rest)


def _check_text(text: str) -> None:
    if is_builtin(text):
        raise _bad(f"{text!r} is the built-in image, not a reference to parse")
    if len(text) > MAX_LENGTH:
        raise _bad(f"reference is {len(text)} characters long, at most {MAX_LENGTH} are accepted")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _bad(f"{_quote(text)} contains a control character (NUL, newline, ...)")
    if text != text.strip():
        raise _bad(f"{_quote(text)} has leading or trailing whitespace")


def _parse_docker(rest: str) -> ImageRef:
    name, at, digest = rest.partition("@")
    repo_part = name.rsplit("/", 1)[-1]
    tag = repo_part.partition(":")[2] if ":" in repo_part else ""
    name = name[: len(name) - len(tag) - 1] if tag else name
    if at and tag:
        raise _bad(f"{_quote('docker://' + rest)}: give a tag or a digest, not both (skopeo cannot fetch both)")
    if not at and not tag:
        raise _bad(f"{_quote('docker://' + rest)}: needs :TAG or @sha256:DIGEST (write :latest to mean latest)")
    _check_docker_name(name)
    if tag and not _TAG.fullmatch(tag):
        raise _bad(f"{_quote('docker://' + rest)}: bad tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    return ImageRef(Transport.DOCKER, name, tag, _digest(digest) if at else "")


def _check_docker_name(name: str) -> None:
    host, slash, path = name.partition("/")
    if not slash or not ("." in host or ":" in host or host == "localhost"):
        raise _bad(f"{_quote('docker://' + name)}: needs a registry host first (docker://registry.example.com/repo:tag); "
                   "there is no default registry")
    host_match = _HOST.fullmatch(host)
    if host_match is None or int(host_match.group("port") or 0) > 65535:
        raise _bad(f"{_quote('docker://' + name)}: bad registry host {host!r}")
    bad = [c for c in path.split("/") if not _COMPONENT.fullmatch(c)]
    if bad:
        raise _bad(f"{_quote('docker://' + name)}: bad repository component {bad[0]!r} (lowercase letters, digits, "
                   "separators '.', '_', '__', '-')")
    if len(name) > _MAX_NAME:
        raise _bad(f"docker://{name[:40]}...: repository name is longer than {_MAX_NAME} characters")


def _digest(text: str) -> str:
    if not _DIGEST.fullmatch(text):
        raise _bad(f"bad digest {_quote(text)}: expected sha256: and 64 lowercase hex digits")
    return text


def _parse_local(transport: Transport, rest: str) -> ImageRef:
    path, colon, tag = rest.partition(":")
    where = f"{transport}:{path}"
    if not path.startswith("/"):
        raise _bad(f"{_quote(where)}: path must be absolute")
    if ".." in path.split("/"):
        raise _bad(f"{_quote(where)}: path may not contain '..'")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise _bad(f"{_quote(where)}: path must be normalised (no '.', '//' or trailing '/')")
    if colon and transport not in _LOCAL_TAGGABLE:
        raise _bad(f"{_quote(where)}: {transport} takes no :TAG (and its path cannot contain ':')")
    if colon and (len(tag) > 128 or not _OCI_NAME.fullmatch(tag)):
        raise _bad(f"{_quote(where)}: bad tag {tag!r} (letters, digits and -._:@+ separators; at most 128)")
    return ImageRef(transport, path, tag)


def _quote(text: str) -> str:
    """The text for a message: bounded, control characters escaped."""
    shown = text if len(text) <= 120 else text[:117] + "..."
    return repr(shown)[1:-1]


def _bad(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{FIELD}: {message}", field=FIELD)
