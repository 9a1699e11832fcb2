"""The one small interface the image cache fetches through.

``SkopeoUmoci`` (tools.py) runs the real skopeo and umoci; ``FakeSource`` (fake.py) serves
images described in memory, for tests of callers that should not need those tools.
"""

from __future__ import annotations

import abc
from pathlib import Path

from services.nodeagent.images.types import IdMap
from snapwake.imageref import ImageRef

__all__ = ["ImageSource"]


class ImageSource(abc.ABC):
    """Resolves references to manifest digests and unpacks images.

    Every method is bounded by ``timeout`` (seconds) and raises from ``snapwake.errors``:
    ``InvalidArgument`` (field ``spec.image``) when the image cannot be had as named (missing,
    corrupt, unauthorized), ``Unavailable`` when the registry or network failed (retry),
    ``DeadlineExceeded`` on timeout, ``FailedPrecondition`` when the node lacks a tool.
    """

    @abc.abstractmethod
    async def resolve(self, ref: ImageRef, authfile: Path | None, timeout: float) -> str:
        """The digest ("sha256:...") of the manifest (or index) that ``ref`` names now."""

    @abc.abstractmethod
    async def unpack(self, ref: ImageRef, authfile: Path | None, dest: Path, owner: IdMap,
                     timeout: float) -> bytes:
        """Writes the root filesystem of ``ref`` (for this node's platform) to ``dest``, which
        must not exist, its files owned through ``owner``; returns the image config JSON.
        ``dest``'s parent is scratch space the caller removes."""
