"""Arena layout and the blobstore manifest. Pure: no torch, no I/O.

Every tensor sits at a 256-byte aligned offset (the alignment cuBLAS and vector loads like) in
one arena. The manifest is ``blobstore_pb2.Manifest``; its JSON form uses proto field names.
The model server leaves ``chunk_bytes``/``chunk_sha256`` empty: the blobstore computes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from snapwake.errors import InvalidArgument
from snapwake.v1 import blobstore_pb2

__all__ = ["ALIGN", "DTYPE_BYTES", "TensorSpec", "align", "from_json", "plan", "to_json", "to_proto"]

ALIGN = 256

# Bytes per element, by torch dtype name (``str(torch.float32)`` without ``torch.``).
DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in the arena."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def align(n: int, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return (n + to - 1) // to * to


def plan(entries: Iterable[tuple[str, str, Sequence[int]]]) -> tuple[list[TensorSpec], int]:
    """Lays ``(name, dtype, shape)`` out back to back at aligned offsets; returns specs and the
    arena size (itself aligned)."""
    specs: list[TensorSpec] = []
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_BYTES:
            raise InvalidArgument(f"tensor {name}: unsupported dtype {dtype!r}", field="dtype")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        specs.append(TensorSpec(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        offset = align(offset + nbytes)
    return specs, offset


def validate(specs: Sequence[TensorSpec], arena_bytes: int) -> None:
    """Raises ``InvalidArgument`` naming the first tensor that is misaligned, the wrong size,
    out of bounds or overlapping another."""
    end = 0
    for s in sorted(specs, key=lambda s: s.offset):
        if s.dtype not in DTYPE_BYTES:
            raise InvalidArgument(f"tensor {s.name}: unsupported dtype {s.dtype!r}", field="tensors")
        if s.offset % ALIGN:
            raise InvalidArgument(f"tensor {s.name}: offset {s.offset} is not {ALIGN}-aligned", field="tensors")
        if s.nbytes != math.prod(s.shape) * DTYPE_BYTES[s.dtype]:
            raise InvalidArgument(f"tensor {s.name}: nbytes {s.nbytes} does not match shape and dtype",
                                  field="tensors")
        if s.offset < end:
            raise InvalidArgument(f"tensor {s.name}: overlaps the tensor before it", field="tensors")
        end = s.offset + s.nbytes
        if end > arena_bytes:
            raise InvalidArgument(f"tensor {s.name}: ends at {end}, past the arena ({arena_bytes})",
                                  field="tensors")


def to_proto(specs: Sequence[TensorSpec], arena_bytes: int, modelserver_config: dict[str, Any],
             snapshot_id: str = "") -> blobstore_pb2.Manifest:
    """The manifest message (chunk checksums left to the blobstore)."""
    return blobstore_pb2.Manifest(
        snapshot_id=snapshot_id, arena_bytes=arena_bytes,
        modelserver_config_json=json.dumps(modelserver_config, sort_keys=True),
        tensors=[blobstore_pb2.ManifestTensor(name=s.name, dtype=s.dtype, shape=list(s.shape),
                                              offset=s.offset, nbytes=s.nbytes) for s in specs])


def to_json(manifest: blobstore_pb2.Manifest) -> dict[str, Any]:
    """The JSON form sent on the handover socket (proto field names; 64-bit ints as strings)."""
    return json_format.MessageToDict(manifest, preserving_proto_field_name=True)


def from_json(data: dict[str, Any]) -> tuple[list[TensorSpec], int, dict[str, Any]]:
    """Parses and validates a manifest's JSON form: specs, arena size, model server config."""
    try:
        msg = json_format.ParseDict(data, blobstore_pb2.Manifest(), ignore_unknown_fields=True)
        modelserver_config = json.loads(msg.modelserver_config_json or "{}")
    except (json_format.ParseError, ValueError) as exc:
        raise InvalidArgument(f"bad manifest: {exc}", field="manifest") from exc
    specs = [TensorSpec(t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in msg.tensors]
    validate(specs, msg.arena_bytes)
    return specs, msg.arena_bytes, modelserver_config
