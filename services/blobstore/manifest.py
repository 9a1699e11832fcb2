"""Manifest helpers: JSON form, digest, chunk geometry and checksums (pure functions)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from google.protobuf import json_format

from services.blobstore.ids import check_snapshot_id
from snapwake import errors
from snapwake.v1.blobstore_pb2 import Manifest

__all__ = ["MAX_CHUNK_BYTES", "Manifest", "check_digest", "chunk_count", "chunk_span", "digest", "fill_checksums",
           "from_dict", "sha256", "to_dict", "validate"]


def to_dict(m: Manifest) -> dict[str, Any]:
    """The manifest as JSON-ready dict, field names as in the proto (the handover wire form)."""
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def from_dict(data: Any, field: str = "manifest") -> Manifest:
    """Parses the JSON form; a malformed manifest is InvalidArgument naming ``field``."""
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"{field}: expected a JSON object", field=field)
    try:
        return json_format.ParseDict(data, Manifest())
    except json_format.ParseError as exc:
        raise errors.InvalidArgument(f"{field}: {exc}", field=field) from None


def digest(m: Manifest) -> str:
    """sha256 of the canonical manifest JSON (sorted keys, no spaces)."""
    canon = json.dumps(to_dict(m), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def check_digest(m: Manifest, expected: str, where: str) -> None:
    """InvalidArgument unless ``m`` has manifest digest ``expected`` (the snapshot record's)."""
    got = digest(m)
    if got != expected:
        raise errors.InvalidArgument(f"{where} has another manifest of {m.snapshot_id} (digest {got[:12]}, "
                                     f"the snapshot record says {expected[:12]})", field="manifest_digest")


def chunk_count(arena_bytes: int, chunk_bytes: int) -> int:
    return -(-arena_bytes // chunk_bytes) if chunk_bytes > 0 else 0


def chunk_span(m: Manifest, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` in the arena."""
    start = index * m.chunk_bytes
    return start, min(m.chunk_bytes, m.arena_bytes - start)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# The largest chunk a sender may declare: a receiver buffers one chunk before it checks it.
MAX_CHUNK_BYTES = 256 << 20


def validate(m: Manifest, sid: str | None = None, need_checksums: bool = True,
             max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Manifest:
    """Checks a manifest's geometry; every problem is InvalidArgument naming the field."""
    check_snapshot_id(m.snapshot_id, "manifest.snapshot_id")
    if sid is not None and m.snapshot_id != sid:
        raise errors.InvalidArgument(
            f"manifest.snapshot_id: {m.snapshot_id!r} does not match {sid!r}", field="manifest.snapshot_id")
    if m.chunk_bytes <= 0:
        raise errors.InvalidArgument("manifest.chunk_bytes: must be > 0", field="manifest.chunk_bytes")
    if m.chunk_bytes > max_chunk_bytes:
        raise errors.InvalidArgument(f"manifest.chunk_bytes: {m.chunk_bytes} is over the limit of {max_chunk_bytes} "
                                     "bytes (a chunk is buffered whole before its checksum is checked)",
                                     field="manifest.chunk_bytes")
    n = chunk_count(m.arena_bytes, m.chunk_bytes)
    if (need_checksums or m.chunk_sha256) and len(m.chunk_sha256) != n:
        raise errors.InvalidArgument(
            f"manifest.chunk_sha256: {len(m.chunk_sha256)} checksums for {n} chunks",
            field="manifest.chunk_sha256")
    for t in m.tensors:
        if t.offset + t.nbytes > m.arena_bytes:
            raise errors.InvalidArgument(
                f"manifest.tensors: {t.name!r} ends at {t.offset + t.nbytes} beyond arena_bytes "
                f"{m.arena_bytes}", field="manifest.tensors")
    return m


def fill_checksums(m: Manifest, data: memoryview, chunk_bytes: int) -> Manifest:
    """Returns a copy of ``m`` cut into ``chunk_bytes`` chunks of ``data`` with their sha256.

    Checksums the sender gave for the same geometry are verified, so corruption on the way in
    is caught rather than stored.
    """
    out = Manifest()
    out.CopyFrom(m)
    out.chunk_bytes = chunk_bytes
    out.ClearField("chunk_sha256")
    given = list(m.chunk_sha256) if m.chunk_bytes == chunk_bytes else []
    for i in range(chunk_count(m.arena_bytes, chunk_bytes)):
        start, length = chunk_span(out, i)
        got = sha256(data[start:start + length])
        if given and given[i] != got:
            raise errors.InvalidArgument(
                f"manifest.chunk_sha256: chunk {i} of {m.snapshot_id} does not match its data",
                field="manifest.chunk_sha256")
        out.chunk_sha256.append(got)
    return out
