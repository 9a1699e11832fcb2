"""Which cached images to remove: the pure core of the cache's size bound."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Usage", "plan_eviction"]


@dataclass(frozen=True)
class Usage:
    """One cached image as eviction sees it."""

    digest: str
    size_bytes: int
    # Held by an instance (or about to be, by a pull that is returning it): never evicted.
    in_use: bool
    # Larger is more recent (a counter, not a clock).
    last_used: int


def plan_eviction(images: Iterable[Usage], max_bytes: int) -> list[str]:
    """The digests to remove, least recently used first, until the images left fit in
    ``max_bytes``; images in use stay even when that leaves the cache over its bound."""
    images = list(images)
    total = sum(u.size_bytes for u in images)
    victims = []
    for usage in sorted((u for u in images if not u.in_use), key=lambda u: u.last_used):
        if total <= max_bytes:
            break
        victims.append(usage.digest)
        total -= usage.size_bytes
    return victims
