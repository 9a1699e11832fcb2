"""Bounding the restarts of a revision whose instances keep failing (pure).

Each instance of a function's current revision that shows up FAILED (a start that failed, or a
container that died later: its node reports the exit status and the output's tail) is one
failure. The controller's own starts of that revision (``min_instances``, standbys) then back
off, doubling from ``base_backoff_s`` up to ``max_backoff_s``; after ``limit`` failures within
``window_s`` the revision is in a crash loop and the controller marks the function FAILED with
the last reason instead of starting another instance. A request's own start is not held back:
it fails fast with the reason, and counts. UpdateFunction (a new revision) starts afresh.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["CrashLoop", "Restarts"]


class Restarts(enum.Enum):
    """What the controller may do for a revision, given its recent failures."""

    START = "start"  # start instances as the policy asks
    HOLD = "hold"  # back off: none of the controller's own starts now (requests still start)
    STOP = "stop"  # a crash loop: mark the function FAILED, start nothing


@dataclass
class CrashLoop:
    """Failures per revision key (``function_id@revision``), each instance counted once."""

    limit: int
    window_s: float
    base_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    # key -> {instance id: when its failure was first seen}
    _seen: dict[str, dict[str, float]] = field(default_factory=dict)

    def note(self, key: str, instance_id: str, now: float) -> bool:
        """Records a failed instance; True when it was not known yet."""
        seen = self._seen.setdefault(key, {})
        if instance_id in seen:
            return False
        # Older than twice the window: its FAILED key expired long ago, it cannot come back.
        for old in [i for i, at in seen.items() if now - at > 2 * self.window_s]:
            del seen[old]
        seen[instance_id] = now
        return True

    def recent(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window."""
        return sum(1 for at in self._seen.get(key, {}).values() if now - at <= self.window_s)

    def looping(self, key: str, now: float) -> bool:
        """Whether ``key`` failed ``limit`` times within the window."""
        return self.recent(key, now) >= self.limit

    def restarts(self, key: str, now: float) -> Restarts:
        if self.looping(key, now):
            return Restarts.STOP
        return Restarts.HOLD if self.hold_until(key, now) > now else Restarts.START

    def hold_until(self, key: str, now: float) -> float:
        """When the controller may start another instance of ``key`` (``now`` or earlier: at once)."""
        recent = [at for at in self._seen.get(key, {}).values() if now - at <= self.window_s]
        if not recent:
            return now
        return max(recent) + min(self.max_backoff_s, self.base_backoff_s * 2 ** (len(recent) - 1))

    def keep(self, keys: set[str]) -> None:
        """Forgets every key not in ``keys`` (deleted functions, past revisions)."""
        self._seen = {k: v for k, v in self._seen.items() if k in keys}
