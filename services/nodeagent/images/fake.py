"""``FakeSource``: images described in memory, for tests of code that pulls them (the nodeagent's
start path) without skopeo or umoci. It honours the same contract as ``SkopeoUmoci``."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.nodeagent.images.source import ImageSource
from services.nodeagent.images.types import IdMap
from snapwake import errors
from snapwake.imageref import ImageRef

__all__ = ["FakeImage", "FakeSource"]


@dataclass(frozen=True)
class FakeImage:
    """One image: its config (the OCI image config JSON as a dict) and its files."""

    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        body = json.dumps({"config": self.config, "files": {k: v.hex() for k, v in self.files.items()}},
                          sort_keys=True)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


class FakeSource(ImageSource):
    """Serves ``images`` by reference text (``str(ImageRef)``); counts unpacks per digest."""

    def __init__(self, images: dict[str, FakeImage] | None = None, delay: float = 0.0) -> None:
        self.images = dict(images or {})
        self.delay = delay
        self.unpacked: list[str] = []

    async def resolve(self, ref: ImageRef, authfile: Path | None, timeout: float) -> str:
        return self._find(ref).digest

    async def unpack(self, ref: ImageRef, authfile: Path | None, dest: Path, owner: IdMap,
                     timeout: float) -> bytes:
        image = self._find(ref)
        await asyncio.sleep(self.delay)
        await asyncio.to_thread(_write, dest, image.files)
        self.unpacked.append(image.digest)
        return json.dumps(image.config).encode()

    def _find(self, ref: ImageRef) -> FakeImage:
        by_digest = {i.digest: i for i in self.images.values()}
        image = self.images.get(str(ref)) or by_digest.get(ref.digest)
        if image is None:
            raise errors.InvalidArgument(f"spec.image: cannot fetch {ref}: no such image", field="spec.image")
        return image


def _write(dest: Path, files: dict[str, bytes]) -> None:
    dest.mkdir()
    for name, data in files.items():
        path = dest / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
